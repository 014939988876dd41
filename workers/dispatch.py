"""Continuous dispatch for the LLM worker (``llm.dispatch: continuous``): every slot kept busy.

The batch loop (workers/loop.py) waits for a whole polled batch before it polls again, so freed
slots stay empty through each batch's tail. Here the consumer is polled about every 100 ms into a
bounded set of admitted records; a call starts as soon as a slot frees; each call's decision and
demonstration are produced when it returns; and each partition commits its *watermark*, the
lowest offset not finished yet, about every second.

Finished means: the call returned (or the record needed none), its outputs were acknowledged by
the broker and its idempotency record was written. A slow call holds back only its own
partition's watermark. After a crash the records past the watermark are redelivered and their
idempotency records keep them from being decided twice.

Flow control: ``consumer.pause()`` when the admitted records (queued, in flight, awaiting their
acknowledgement) reach ``llm.window``, or a partition's offsets past its watermark reach
``llm.partition_window``; the consumer keeps polling (and so never exceeds
``max_poll_interval_ms``). Retries wait on a timer heap, not in a sleeping slot, and 429s halve
the in-flight limit (AIMD), which successes raise again.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from cascade.logging import get_logger
from cascade.messages import Deferred, LLMAnswer
from cascade.tiers.llm import CIRCUIT_OPEN, LLMError, retry_delay
from workers.kafka_io import Delivery, commit_offsets, poll_records, send_each, undelivered, unpark_resumed_fetches
from workers.loop import _REBALANCING, ACK_TIMEOUT_S, BatchResult, Pipeline, commit_retriable, state_unavailable
from workers.outage import Interrupted, OutageTimeout, kafka_retriable

if TYPE_CHECKING:
    from workers.llm_worker import LLMWorker

log = get_logger("cascade.worker.dispatch")

POLL_INTERVAL_S = 0.1
# A rebalance waits this long for the revoked partitions' calls. The listener runs on the
# consumer's IO thread, which heartbeats too: it must stay well inside the session timeout.
REVOKE_WAIT_S = 3.0
STOP_WAIT_S = 30.0  # SIGTERM: how long the calls in flight may take to finish
THROTTLED = "rate_limited"


# --------------------------------------------------------------------------- watermarks


class Watermarks:
    """Per partition, the admitted offsets not finished yet and the offset safe to commit.

    Offsets are admitted in increasing order per partition (as the consumer delivers them) and
    finish in any order; the watermark is the lowest unfinished one, or one past the last
    admitted when all are finished.
    """

    def __init__(self) -> None:
        self._open: dict[TopicPartition, deque[int]] = {}
        self._done: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def admit(self, tp: TopicPartition, offset: int) -> None:
        self._open.setdefault(tp, deque()).append(offset)
        self._done.setdefault(tp, set())
        self._next[tp] = offset + 1

    def finish(self, tp: TopicPartition, offset: int) -> None:
        """Mark one offset finished (ignored for partitions forgotten since, see :meth:`forget`)."""
        opened = self._open.get(tp)
        if not opened or offset < opened[0]:
            return  # a partition forgotten since, or an offset finished already
        done = self._done[tp]
        done.add(offset)
        while opened and opened[0] in done:
            done.discard(opened.popleft())

    def watermark(self, tp: TopicPartition) -> int | None:
        opened = self._open.get(tp)
        if opened is None:
            return None
        return opened[0] if opened else self._next[tp]

    def span(self, tp: TopicPartition) -> int:
        """Offsets admitted past the watermark (finished or not): what a crash would redeliver."""
        mark = self.watermark(tp)
        return 0 if mark is None else self._next[tp] - mark

    def unfinished(self) -> int:
        return sum(len(o) - len(self._done[tp]) for tp, o in self._open.items())

    def lag(self) -> int:
        return sum(self.span(tp) for tp in self._open)

    def to_commit(self, owned: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The watermarks of ``owned`` partitions that moved since their last commit."""
        out = {}
        for tp in owned:
            mark = self.watermark(tp)
            if mark is not None and mark != self._committed.get(tp):
                out[tp] = mark
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        self._committed.update(offsets)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions revoked: whatever is open there is the new owner's to redo."""
        for tp in partitions:
            for d in (self._open, self._done, self._next, self._committed):
                d.pop(tp, None)


# --------------------------------------------------------------------------- AIMD


class AIMDLimit:
    """The in-flight limit: halved on a throttled call (429), raised by 1/limit on each success
    (so by about one per limit's worth of successes), between ``floor`` and ``ceiling``.

    Calls started before the last decrease were sent into the same congestion: their 429s do not
    halve the limit again, so one storm of 429s halves it once per round trip, not per call.
    """

    def __init__(self, ceiling: int, floor: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.ceiling = ceiling
        self.floor = min(floor, ceiling)
        self.limit = float(ceiling)
        self._clock = clock
        self._decreased_at = float("-inf")

    @property
    def slots(self) -> int:
        return int(self.limit)

    def throttled(self, started_at: float) -> None:
        if started_at < self._decreased_at:
            return
        self.limit = max(float(self.floor), self.limit / 2)
        self._decreased_at = self._clock()

    def succeeded(self) -> None:
        self.limit = min(float(self.ceiling), self.limit + 1 / self.limit)


# --------------------------------------------------------------------------- retry timers

T = TypeVar("T")


class RetryTimers(Generic[T]):
    """Items due at a time: a heap, popped by the dispatch loop (no thread sleeps per retry)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._seq = itertools.count()  # equal times pop in insertion order; items need no ordering

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, item: T) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), item))

    def pop_due(self, now: float) -> list[T]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def remove(self, drop: Callable[[T], bool]) -> list[T]:
        """Take out the items ``drop`` selects; returns them."""
        kept: list[tuple[float, int, T]] = []
        gone: list[tuple[float, int, T]] = []
        for entry in self._heap:
            (gone if drop(entry[2]) else kept).append(entry)
        heapq.heapify(kept)
        self._heap = kept
        return [e[2] for e in gone]


# --------------------------------------------------------------------------- the driver


@dataclass(eq=False)
class Job:
    """One LLM call to make for one record: an event to decide, or a tier's audit to measure."""

    record: ConsumerRecord
    item: Deferred
    audit: bool = False
    attempt: int = 0  # retries so far
    started: float = 0.0  # monotonic start of the current attempt

    @property
    def partition(self) -> TopicPartition:
        return TopicPartition(self.record.topic, self.record.partition)


@dataclass
class Admission:
    """What admitting records gives: the outputs of those settled at once (dead letters, cache
    hits, budget fallbacks, holds), and the calls to make for the rest."""

    result: BatchResult = field(default_factory=BatchResult)
    calls: list[Job] = field(default_factory=list)


class Dispatcher(Protocol):
    """The LLM worker as the driver sees it."""

    def admit(self, records: list[ConsumerRecord]) -> Admission: ...
    def call_once(self, job: Job) -> LLMAnswer | LLMError: ...
    def settle_call(self, job: Job, outcome: LLMAnswer | LLMError) -> BatchResult: ...
    def drop_call(self, job: Job) -> None: ...


@dataclass
class _Group:
    """Outputs produced together, and the offsets they finish once acknowledged and recorded."""

    result: BatchResult
    offsets: list[tuple[TopicPartition, int]]


@dataclass
class _Called:
    job: Job
    outcome: LLMAnswer | LLMError


@dataclass
class _Recorded:
    """Groups acknowledged and recorded (or the error that stopped it)."""

    groups: int
    offsets: list[tuple[TopicPartition, int]]
    after_produce: list[Callable[[], None]]
    error: BaseException | None = None


def _offset_of(rec: ConsumerRecord) -> tuple[TopicPartition, int]:
    return TopicPartition(rec.topic, rec.partition), rec.offset


class ContinuousDispatch:
    """Runs the LLM worker's consumer (see the module docstring). One thread (the worker's) runs
    :meth:`serve`; calls run on the worker's pool, acknowledgements on a recorder thread, and both
    report back through a queue. The rebalance listener runs on the consumer's IO thread while
    :meth:`serve` is inside ``poll``; ``_lock`` keeps the two apart (never held across a consumer
    call, which may wait for the IO thread)."""

    ADMIT_GROUP = 32  # records per duplicate check and budget take

    def __init__(self, worker: LLMWorker, flow: Pipeline) -> None:
        self.worker = worker
        self.llm: Dispatcher = worker
        self.flow = flow  # its producer (re-created when fenced) and its redelivery
        cfg = worker.config.llm
        self.window = cfg.window
        self.partition_window = cfg.partition_window
        self.commit_interval_s = cfg.commit_interval_s
        self.max_retries = cfg.max_retries
        self.backoff_s = cfg.retry_backoff_s
        self.rng = random.Random()
        self.limit = AIMDLimit(cfg.concurrency)
        self.pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="llm-call")
        self.recorder = ThreadPoolExecutor(1, thread_name_prefix="llm-recorder")
        self.marks = Watermarks()
        self.arrived: deque[ConsumerRecord] = deque()  # polled, not admitted yet
        self.ready: deque[Job] = deque()  # admitted, waiting for a slot
        self.timers: RetryTimers[Job] = RetryTimers()
        self.in_flight: set[Job] = set()
        self.to_record: queue.SimpleQueue[tuple[Delivery, KafkaProducer, _Group]] = queue.SimpleQueue()
        self.unacked = 0  # groups produced, not recorded yet
        self.revoked: set[TopicPartition] = set()  # until the next assignment: nothing of theirs starts
        self.orphans: set[Job] = set()  # in flight when their partition was revoked: dropped on return
        # Revoked partitions' watermarks: kafka-python 3 keeps the fetch position of a partition
        # assigned again in the same rebalance, past the records dropped here; it is sought back.
        self.rewind: dict[TopicPartition, int] = {}
        self.events: queue.SimpleQueue[_Called | _Recorded] = queue.SimpleQueue()
        self.pending = _Group(BatchResult(), [])  # outputs of this round, produced together
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ the loop

    def listener(self) -> ConsumerRebalanceListener:
        return _DrainOnRevoke(self)

    def serve(self, consumer: KafkaConsumer, max_idle_s: float | None = None) -> None:
        """Until the worker stops (or nothing happened for ``max_idle_s``)."""
        w = self.worker
        last_poll = last_commit = 0.0
        last_work = time.monotonic()
        assignment: set[TopicPartition] = set()
        while not w.stopping:
            now = time.monotonic()
            if now - last_poll >= POLL_INTERVAL_S:
                last_poll = now
                w.health.beat()
                w._idle()
                self._flow_control(consumer)
                busy = self._busy()
                room = max(1, self.window - self.marks.unfinished())
                poll = partial(poll_records, consumer, timeout_ms=0 if busy else int(POLL_INTERVAL_S * 1000),
                               max_records=room)
                records = self._rewound(consumer, w.broker.retry("poll", poll, kafka_retriable))
                if consumer.assignment() != assignment:
                    assignment = set(consumer.assignment())
                    last_work = time.monotonic()
                    log.info("assigned", role=w.role, partitions=len(assignment))
                w.health.ready = w._ready(bool(assignment))
                if records or busy:
                    last_work = time.monotonic()
                elif max_idle_s is not None and time.monotonic() - last_work > max_idle_s:
                    break
                if records:
                    w.metrics.events_in.labels(w.role).inc(len(records))
                    with self._lock:
                        for rec in records:
                            tp, offset = _offset_of(rec)
                            if tp not in self.revoked:
                                self.marks.admit(tp, offset)
                                self.arrived.append(rec)
            with self._lock:
                self._round(wait_s=max(0.0, last_poll + POLL_INTERVAL_S - time.monotonic()))
            if time.monotonic() - last_commit >= self.commit_interval_s:
                last_commit = time.monotonic()
                self._commit(consumer)
                w.control()
                self._gauges(consumer)
        self._finish(consumer, STOP_WAIT_S)

    def _rewound(self, consumer: KafkaConsumer, records: list[ConsumerRecord]) -> list[ConsumerRecord]:
        """Seek partitions kept through a rebalance back to their watermark; their records from
        this poll are dropped (fetched again from there)."""
        with self._lock:
            rewind, self.rewind = self.rewind, {}
        if not rewind:
            return records
        owned = consumer.assignment()
        for tp, offset in rewind.items():
            if tp in owned:
                consumer.seek(tp, offset)
        return [r for r in records if _offset_of(r)[0] not in rewind]

    def _busy(self) -> bool:
        return bool(self.arrived or self.ready or self.in_flight or self.timers or self.unacked)

    def _round(self, wait_s: float) -> None:
        """Admit, start calls, wait up to ``wait_s`` for calls or acknowledgements, settle them."""
        self._admit()
        self._start_calls()
        self._handle_events(wait_s)
        self._start_calls()
        self._flush()

    def _admit(self) -> None:
        """Admit arrived records in small groups while fewer calls wait than slots could take."""
        while self.arrived and len(self.ready) < max(self.limit.slots, self.ADMIT_GROUP):
            group = [self.arrived.popleft() for _ in range(min(self.ADMIT_GROUP, len(self.arrived)))]
            admission = self._admit_isolated(group)
            called = {id(job.record) for job in admission.calls}
            self._add_outputs(admission.result, [_offset_of(r) for r in group if id(r) not in called])
            self.ready.extend(admission.calls)

    def _admit_isolated(self, records: list[ConsumerRecord]) -> Admission:
        """A group whose admission raises is admitted again one record at a time; a record that
        raises alone is dead-lettered."""
        try:
            # A state store away is waited out (the worker not ready meanwhile), not dead-lettered.
            return self.worker.state_outage.retry("admit", lambda: self.llm.admit(records), state_unavailable)
        except (OutageTimeout, Interrupted):
            raise
        except Exception as e:
            if len(records) == 1:
                return Admission(result=self.worker._failed(records[0], e))
        out = Admission()
        for rec in records:
            one = self._admit_isolated([rec])
            out.calls.extend(one.calls)
            out.result.extend(one.result)
        return out

    def _start_calls(self) -> None:
        for job in self.timers.pop_due(time.monotonic()):
            self.ready.append(job)
        while self.ready and len(self.in_flight) < self.limit.slots:
            job = self.ready.popleft()
            job.started = time.monotonic()
            self.in_flight.add(job)
            self.pool.submit(self._call, job)

    def _call(self, job: Job) -> None:
        try:
            outcome: LLMAnswer | LLMError = self.llm.call_once(job)
        except Exception as e:  # a bug in the call path: settled as that event's failure
            outcome = LLMError("call_error", f"{type(e).__name__}: {e}", retryable=False)
        self.events.put(_Called(job, outcome))

    def _handle_events(self, wait_s: float) -> None:
        due = self.timers.next_due()
        if due is not None:
            wait_s = min(wait_s, max(0.0, due - time.monotonic()))
        try:
            # The lock is released while waiting, so the rebalance listener is never held up here.
            self._lock.release()
            try:
                first = self.events.get(timeout=wait_s) if wait_s > 0 else self.events.get_nowait()
            finally:
                self._lock.acquire()
        except queue.Empty:
            return
        self._on_event(first)
        while True:
            try:
                self._on_event(self.events.get_nowait())
            except queue.Empty:
                return

    def _on_event(self, event: _Called | _Recorded) -> None:
        if isinstance(event, _Called):
            self._called(event.job, event.outcome)
            return
        self.unacked -= event.groups
        if event.error is not None:
            raise event.error  # a failed produce stops the worker: nothing of it is committed
        for step in event.after_produce:
            step()
        for tp, offset in event.offsets:
            self.marks.finish(tp, offset)

    def _called(self, job: Job, outcome: LLMAnswer | LLMError) -> None:
        self.in_flight.discard(job)
        if job in self.orphans:
            self.orphans.discard(job)  # dropped when its partition was revoked: the new owner decides it
            return
        if isinstance(outcome, LLMError):
            if outcome.reason == THROTTLED:
                self.limit.throttled(job.started)
            if outcome.retryable and outcome.reason != CIRCUIT_OPEN and job.attempt < self.max_retries:
                self.worker.metrics.llm_retries.labels(self.worker.role).inc()
                log.warning("llm_retry", event_id=job.item.event.id, attempt=job.attempt + 1, reason=outcome.reason)
                delay = retry_delay(job.attempt, self.backoff_s, self.rng, outcome)
                job.attempt += 1
                self.timers.push(time.monotonic() + delay, job)
                return
        else:
            self.limit.succeeded()
        try:
            result = self.worker.state_outage.retry("settle", lambda: self.llm.settle_call(job, outcome),
                                                    state_unavailable)
        except (OutageTimeout, Interrupted):
            raise
        except Exception as e:  # this event's failure only: dead-lettered, the worker goes on
            self.llm.drop_call(job)
            result = self.worker._failed(job.record, e)
        self._add_outputs(result, [_offset_of(job.record)])

    def _add_outputs(self, result: BatchResult, offsets: Sequence[tuple[TopicPartition, int]]) -> None:
        self.pending.result.extend(result)
        self.pending.offsets.extend(offsets)

    def _flush(self) -> None:
        """Produce this round's outputs; the recorder thread waits for their acknowledgement,
        runs their ``on_ack`` steps (idempotency records, cache), then reports them finished."""
        group, self.pending = self.pending, _Group(BatchResult(), [])
        if not group.offsets and not group.result.records:
            return
        producer = self.flow.producer
        self.to_record.put((send_each(producer, group.result.records), producer, group))
        self.unacked += 1
        self.recorder.submit(self._record_waiting)

    def _record_waiting(self) -> None:
        """On the recorder thread: every group produced so far, acknowledgements awaited together
        (one group at a time, the ack round trips would queue behind each other), recorded in order."""
        batch = []
        while True:
            try:
                batch.append(self.to_record.get_nowait())
            except queue.Empty:
                break
        if not batch:
            return  # taken by the previous run
        groups = [g for _, _, g in batch]
        done = _Recorded(len(groups), [o for g in groups for o in g.offsets],
                         [step for g in groups for step in g.result.after_produce])
        try:
            # The groups' records are all in flight, so waiting on them one group after another
            # costs one round trip; what the broker did not acknowledge is sent again (a broker
            # outage waited out, a fenced producer re-created) before anything is recorded.
            for delivery, sent_on, _ in batch:
                failed, error = undelivered(delivery, timeout_s=ACK_TIMEOUT_S)
                if failed:
                    self.flow.redeliver(failed, error, sent_on)
            for g in groups:
                for step in g.result.on_ack:
                    step()
        except Exception as e:  # noqa: BLE001 - reported to the dispatch loop, which stops
            done.error = e
        self.events.put(done)

    # ------------------------------------------------------------------ flow control and commits

    def _flow_control(self, consumer: KafkaConsumer) -> None:
        owned = consumer.assignment()
        with self._lock:
            full = self.worker.paused() or self.marks.unfinished() >= self.window
            want = set(owned) if full else {tp for tp in owned if self.marks.span(tp) >= self.partition_window}
        paused = consumer.paused()
        if want - paused:
            consumer.pause(*(want - paused))
        if paused - want:
            consumer.resume(*(paused - want))
            unpark_resumed_fetches(consumer, paused - want)

    def _commit(self, consumer: KafkaConsumer) -> None:
        with self._lock:
            offsets = self.marks.to_commit(consumer.assignment())
        if not offsets:
            return
        try:
            self.worker.broker.retry("commit", lambda: commit_offsets(consumer, offsets), commit_retriable)
        except _REBALANCING as e:
            log.warning("commit_skipped_rebalance", role=self.worker.role, partitions=len(offsets), error=type(e).__name__)
            return
        with self._lock:
            self.marks.committed(offsets)

    def _gauges(self, consumer: KafkaConsumer) -> None:
        m, role = self.worker.metrics, self.worker.role
        m.paused_partitions.labels(role).set(len(consumer.paused()))
        with self._lock:
            m.llm_in_flight.labels(role).set(len(self.in_flight))
            m.llm_limit.labels(role).set(self.limit.limit)
            m.llm_queued.labels(role).set(len(self.arrived) + len(self.ready) + len(self.timers))
            m.state_errors.labels(role).set(sum(self.worker.state.errors.values()))
            m.watermark_lag.labels(role).set(self.marks.lag())

    # ------------------------------------------------------------------ rebalance and stop

    def drain(self, partitions: set[TopicPartition], wait_s: float) -> None:
        """Stop dispatching ``partitions``; wait up to ``wait_s`` for their calls and for every
        acknowledgement outstanding; then forget them (their unfinished records are redelivered
        to the new owner). Calls of theirs still running are dropped when they return."""
        with self._lock:
            self.revoked |= partitions
            self.arrived = deque(r for r in self.arrived if _offset_of(r)[0] not in partitions)
            dropped = [j for j in self.ready if j.partition in partitions]
            self.ready = deque(j for j in self.ready if j.partition not in partitions)
            dropped += self.timers.remove(lambda j: j.partition in partitions)
            for job in dropped:
                self.llm.drop_call(job)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and (
                any(j.partition in partitions for j in self.in_flight) or self.unacked or self.pending.offsets
            ):
                self._flush()
                self._handle_events(min(0.05, max(0.0, deadline - time.monotonic())))
            # Still running: given up now (budget refunded, the id free to be admitted again,
            # whoever owns the partition next), and ignored when they return.
            for job in [j for j in self.in_flight if j.partition in partitions]:
                self.orphans.add(job)
                self.llm.drop_call(job)
            for tp in partitions:
                mark = self.marks.watermark(tp)
                if mark is not None:
                    self.rewind[tp] = mark
            self.marks.forget(partitions)

    def assigned(self, partitions: set[TopicPartition]) -> None:
        with self._lock:
            self.revoked -= partitions

    def _finish(self, consumer: KafkaConsumer, wait_s: float) -> None:
        """On stop: no new calls; the calls in flight finish (up to ``wait_s``), are produced,
        acknowledged and committed."""
        with self._lock:
            for job in [*self.ready, *self.timers.remove(lambda _: True)]:
                self.llm.drop_call(job)
            self.ready.clear()
            self.arrived.clear()
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and (self.in_flight or self.unacked or self.pending.offsets):
                self._flush()
                self._handle_events(min(0.05, max(0.0, deadline - time.monotonic())))
        self._commit(consumer)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.recorder.shutdown(wait=True)


class _DrainOnRevoke(ConsumerRebalanceListener):
    """Runs on the consumer's IO thread (kafka-python 3), where the consumer must not be called:
    the revoked partitions' last watermarks are not committed here; the records past them are
    redelivered to the new owner, who finds them decided (their idempotency records are written
    before the drain returns)."""

    def __init__(self, dispatch: ContinuousDispatch) -> None:
        self.dispatch = dispatch

    def on_partitions_revoked(self, revoked: object) -> None:
        self.dispatch.drain(set(revoked), REVOKE_WAIT_S)  # type: ignore[call-overload]

    def on_partitions_assigned(self, assigned: object) -> None:
        self.dispatch.assigned(set(assigned))  # type: ignore[call-overload]
