"""The loop every worker runs: poll a batch, process it, produce the outputs, wait for the
broker's acknowledgement, record what was decided, and only then commit the input offsets.

At-least-once: a crash anywhere before the commit redelivers the batch; the idempotency
record (event ids already decided) keeps the redelivery from producing a second decision.
SIGTERM finishes the batch in flight, commits, and leaves the group.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, IllegalGenerationError, RebalanceInProgressError, UnknownMemberIdError
from kafka.structs import TopicPartition

from cascade.config import CascadeConfig
from cascade.logging import get_logger
from cascade.messages import DeadLetter, Decision
from cascade.state import StateUnavailable, make_state
from cascade.state.keys import NO_MARK, text_mark
from cascade.state.loss import LossDetector
from workers.kafka_io import (
    Delivery,
    LagProbe,
    OutRecord,
    ProduceError,
    commit_batch,
    ensure_topics,
    make_consumer,
    make_producer,
    poll_records,
    require_topics,
    send_each,
    undelivered,
)
from workers.observability import HealthServer, LagSampler, WorkerMetrics
from workers.outage import Interrupted, Outage, kafka_retriable, producer_broken, producer_fenced
from workers.topics import Topics

log = get_logger("cascade.worker")

# A commit refused because the group is rebalancing or has moved on without this member.
_YOUNG_GC_THRESHOLD = 20_000
_REBALANCING = (CommitFailedError, RebalanceInProgressError, IllegalGenerationError, UnknownMemberIdError)
# Longer than the producer's delivery timeout (30 s): the producer fails a record before it is
# given up on here, so a record is never sent again while the first send may still land.
ACK_TIMEOUT_S = 45.0
# A delivery still failing after this many retries: the producer is re-created (a stuck one).
_RECREATE_PRODUCER_EVERY = 3


def commit_retriable(e: BaseException) -> bool:
    return not isinstance(e, _REBALANCING) and kafka_retriable(e)


def state_unavailable(e: BaseException) -> bool:
    return isinstance(e, StateUnavailable)


@dataclass
class BatchResult:
    records: list[OutRecord] = field(default_factory=list)
    # Run on the pipeline's recorder thread as soon as the broker acknowledged ``records``, while
    # the worker processes its next batch: thread-safe steps only (state-store writes).
    on_ack: list[Callable[[], object]] = field(default_factory=list)
    # Run on the worker's thread after ``on_ack``, before the offsets are committed.
    after_produce: list[Callable[[], None]] = field(default_factory=list)

    def extend(self, other: BatchResult) -> None:
        self.records.extend(other.records)
        self.on_ack.extend(other.on_ack)
        self.after_produce.extend(other.after_produce)


class Driver(Protocol):
    """What replaces the batch loop for a worker that brings its own (the LLM worker's
    continuous dispatch, workers/dispatch.py): its rebalance listener, and its loop."""

    def listener(self) -> ConsumerRebalanceListener: ...

    def serve(self, consumer: KafkaConsumer, max_idle_s: float | None) -> None:
        """Consume until the worker stops (or idles ``max_idle_s``); commit what it finished."""


# A dead letter must fit any producer's max_request_size and the broker's default message size
# (1 MiB) with room to spare; a larger one is truncated, never dropped.
DEAD_LETTER_MAX_BYTES = 512 * 1024
DEAD_LETTER_HEAD_BYTES = 64 * 1024  # what a truncated dead letter keeps of the original
_MAX_KEY_BYTES = 1024


def dead_letter(topics: Topics, stage: str, rec: ConsumerRecord, reason: str, detail: str,
                max_bytes: int = DEAD_LETTER_MAX_BYTES) -> OutRecord:
    """The dead-letter record of ``rec``: the reason, and the original bytes whole if the record
    fits ``max_bytes``, else their first :data:`DEAD_LETTER_HEAD_BYTES` (``truncated``)."""
    value = rec.value if isinstance(rec.value, bytes) else b""
    key_bytes = rec.key if isinstance(rec.key, bytes) else None
    if key_bytes is not None and len(key_bytes) > _MAX_KEY_BYTES:
        key_bytes = hashlib.sha256(key_bytes).hexdigest().encode()
    key = key_bytes.decode("utf-8", "replace") if key_bytes else None
    msg = DeadLetter(
        reason=reason, detail=detail[:2000], stage=stage, source_topic=rec.topic, partition=rec.partition,
        offset=rec.offset, key=key, original_b64=base64.b64encode(value).decode("ascii"),
        original_size=len(value), original_sha256=hashlib.sha256(value).hexdigest(),
    )
    out = msg.model_dump_json().encode()
    if len(out) + len(key_bytes or b"") > max_bytes:
        head = value[: min(DEAD_LETTER_HEAD_BYTES, max_bytes // 4)]
        msg = msg.model_copy(update={"original_b64": base64.b64encode(head).decode("ascii"), "truncated": True})
        out = msg.model_dump_json().encode()
    return OutRecord(topics.deadletter, key_bytes, out)


class Worker:
    """Consume-process-produce-commit for one role; subclasses implement ``process``."""

    role: str = "worker"
    input_pattern: str | None = None  # a regex subscription instead of input_topics (the first tier's)

    def __init__(self, config: CascadeConfig, input_topics: Sequence[str], group: str, metrics_port: int | None = None) -> None:
        self.config = config
        self.topics = Topics(config)
        self.input_topics = list(input_topics)
        self.group = group
        self.metrics = WorkerMetrics(self.role)
        port = config.server.metrics_port if metrics_port is None else metrics_port
        self.health = HealthServer(self.metrics, port, host=config.server.metrics_host)
        self.stopping = False
        self.state = make_state(config)
        self._deciding: set[str] = set()  # decided in a batch whose outputs are still in flight
        self.broker = self._outage("kafka", config.kafka.outage_timeout_s)
        self.state_outage = self._outage("state", config.state.outage_timeout_s)
        # Whether the consumer group had committed offsets when the worker started (set by run()).
        self.fresh_group: bool | None = None
        self.loss: LossDetector | None = None  # set by run(), once fresh_group is known

    def _outage(self, what: str, timeout_s: float) -> Outage:
        def changed(active: bool) -> None:
            self.metrics.outage.labels(self.role, what).set(float(active))
            if active:
                self.health.ready = False

        self.metrics.outage.labels(self.role, what).set(0.0)
        return Outage(what, timeout_s, on_change=changed, beat=self.health.beat, stopping=lambda: self.stopping,
                      on_retry=lambda op: self.metrics.outage_retries.labels(self.role, what, op).inc())

    def undecided(self, ids: Sequence[str]) -> list[str]:
        """The ids with no decision yet: neither recorded in the state store nor in flight."""
        deciding = self._deciding.copy()  # before the read: see record_decided
        return self._fresh(ids, self.state.seen(ids), deciding)

    def undecided_with_cache(self, ids: Sequence[str], cache_keys: Sequence[str]) -> list[tuple[str, Decision | None]]:
        """:meth:`undecided`, each with its cached decision if any (one state-store round trip)."""
        deciding = self._deciding.copy()
        seen, cached = self.state.seen_and_decisions(ids, cache_keys)
        hits = dict(zip(ids, cached))
        return [(i, hits[i]) for i in self._fresh(ids, seen, deciding)]

    def undecided_checked(self, ids: Sequence[str], cache_keys: Sequence[str],
                          texts: Sequence[str]) -> tuple[list[tuple[str, Decision | None]], list[str]]:
        """:meth:`undecided_with_cache`, and the ids decided before with another text (conflicts:
        the idempotency record keeps a mark of the text each id was decided with)."""
        deciding = self._deciding.copy()
        marks, cached = self.state.marks_and_decisions(ids, cache_keys)
        conflicts = [i for i, m, t in zip(ids, marks, texts) if m is not None and m != NO_MARK and m != text_mark(t)]
        hits = dict(zip(ids, cached))
        fresh = self._fresh(ids, [m is not None for m in marks], deciding)
        return [(i, hits[i]) for i in fresh], conflicts

    @staticmethod
    def _fresh(ids: Sequence[str], seen: Sequence[bool], deciding: set[str]) -> list[str]:
        return [i for i, done in zip(ids, seen) if not done and i not in deciding]

    def record_decided(self, result: BatchResult, ids: Sequence[str], texts: Sequence[str] | None = None) -> None:
        """Once ``result`` is acknowledged, record ``ids`` as decided (the idempotency record).

        Until then they are in ``_deciding``. The recorder thread writes the record first and only
        then takes them out, so an id read as not decided from a copy of ``_deciding`` taken before
        the state-store read is truly undecided. With ``texts``, the record keeps a mark of each
        id's text (see :meth:`undecided_checked`).
        """
        ids = list(ids)
        if not ids:
            return
        self._deciding.update(ids)
        marks = None if texts is None else [text_mark(t) for t in texts]

        def record() -> None:
            self.state.claim_events(ids, marks=marks)
            self._deciding.difference_update(ids)

        result.on_ack.append(record)

    def process(self, records: list[ConsumerRecord]) -> BatchResult:
        """:meth:`process_batch`, with a failure isolated to the event that caused it.

        A batch that raises is processed again one event at a time; an event that raises alone
        is dead-lettered (``processing_error``, with the exception) and the worker goes on. Steps
        of the failed attempt that already ran (budget taken, demonstrations learned) are not
        undone: rare, and each is at worst counted twice.
        """
        try:
            return self._attempt(records)
        except StateUnavailable:
            raise  # not the events' fault: the batch waits for the store (see run)
        except Exception as e:
            if len(records) == 1:
                return self._failed(records[0], e)
            log.warning("batch_failed_isolating", role=self.role, records=len(records), error=repr(e)[:500])
        res = BatchResult()
        for rec in records:
            try:
                one = self._attempt([rec])
            except StateUnavailable:
                raise
            except Exception as e:
                one = self._failed(rec, e)
            res.records.extend(one.records)
            res.on_ack.extend(one.on_ack)
            res.after_produce.extend(one.after_produce)
        return res

    def _attempt(self, records: list[ConsumerRecord]) -> BatchResult:
        before = self._deciding.copy()
        try:
            return self.process_batch(records)
        except Exception:
            # Ids a failed attempt marked in flight will not be recorded by it: unmark them.
            self._deciding.intersection_update(before)
            raise

    def _failed(self, rec: ConsumerRecord, e: Exception) -> BatchResult:
        detail = f"{type(e).__name__}: {e}"
        log.error("processing_error", role=self.role, topic=getattr(rec, "topic", None),
                  partition=getattr(rec, "partition", None), offset=getattr(rec, "offset", None), error=detail[:500])
        self.metrics.dead_letters.labels(self.role, "processing_error").inc()
        return BatchResult(records=[dead_letter(self.topics, self.role, rec, "processing_error", detail)])

    def process_batch(self, records: list[ConsumerRecord]) -> BatchResult:
        raise NotImplementedError

    def idle(self) -> None:
        """Between polls: hot-swap models, refresh live parameters."""

    def _idle(self) -> None:
        self._check_loss()
        try:
            self.idle()
        except StateUnavailable as e:  # the models and parameters in use serve on meanwhile
            log.debug("idle_state_unavailable", role=self.role, error=str(e))

    def on_stop(self) -> None:
        """Before the final commit on shutdown (the learner publishes what it learned)."""

    def driver(self, flow: Pipeline) -> Driver | None:
        """A loop of the worker's own instead of the batch loop (producing through ``flow``, which
        owns the producer and sends again what the broker did not acknowledge); None: the batch loop."""
        return None

    def paused(self) -> bool:
        """While True the worker stays in its group but fetches nothing (the LLM worker holding for budget)."""
        return False

    def should_commit(self) -> bool:
        """Whether everything consumed so far may be committed now (the learner waits for a snapshot)."""
        return True

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("stopping", role=self.role, signal=signal.Signals(signum).name)
        self.stopping = True

    def _group_had_offsets(self) -> bool:
        with LagProbe(self.config.kafka) as probe:
            return bool(probe.committed(self.group))

    def _check_loss(self, force: bool = False) -> bool:
        """Whether the state store was found emptied (and the loss is not yet confirmed)."""
        if self.loss is None:
            return False
        lost = self.loss.check(force)
        self.metrics.redis_loss.labels(self.role).set(float(lost))
        return lost

    def _ready(self, assigned: bool) -> bool:
        return assigned and not self.broker.active and not self.state_outage.active and self.state.available

    def run(self, max_idle_s: float | None = None) -> None:
        """The loop; raises :class:`workers.outage.OutageTimeout` after an outage outlasting its
        timeout (the worker exits with ``OUTAGE_EXIT_CODE``)."""
        kcfg = self.config.kafka
        self.broker.retry("topics", lambda: ensure_topics(kcfg, self.topics.all(), kcfg.partitions, kcfg.replication_factor),
                          kafka_retriable)
        self.broker.retry("topics", lambda: require_topics(kcfg, [t for t in self.input_topics if t in self.topics.external]),
                          kafka_retriable)
        self.fresh_group = not self.broker.retry("group_offsets", self._group_had_offsets, kafka_retriable)
        self.loss = LossDetector(self.state, self.config.state.on_redis_loss, not self.fresh_group, self.role)
        self._check_loss(force=True)
        flow = Pipeline(self, lambda: self.broker.retry(
            "producer", lambda: make_producer(kcfg, client_id=f"{self.group}-producer"), kafka_retriable))
        driver = self.driver(flow)
        listener = driver.listener() if driver is not None else _FinishOnRevoke(flow)
        consumer = self.broker.retry("consumer", lambda: make_consumer(
            kcfg, self.group, self.input_topics, client_id=f"{self.group}-consumer", pattern=self.input_pattern,
            listener=listener), kafka_retriable)
        flow.consumer = consumer
        lag = LagSampler(self.metrics, kcfg, self.group, self.input_topics)
        # What exists now (modules, clients, the first models) lives as long as the process: out of
        # the cyclic collector's reach, full collections stop rescanning it. They had cost a tier
        # worker a fifth of its time, for batches whose garbage refcounting frees anyway.
        gc_threshold = gc.get_threshold()
        gc.freeze()
        # Events allocate dozens of objects each, most freed by refcounting within the batch: at
        # the default threshold of 700 the young collection ran every fiftieth event and cost a
        # tier worker about 6% of its time.
        gc.set_threshold(_YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
        log.info("started", role=self.role, group=self.group, topics=self.input_topics, metrics_port=self.health.port)
        last_work = time.monotonic()
        assignment: set[TopicPartition] = set()
        # Restored on return: a worker run inside another program (a test, a benchmark) must not
        # leave it deaf to SIGTERM, nor processes it forks later (multiprocessing pools).
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if driver is not None:
                driver.serve(consumer, max_idle_s)
            while driver is None and not self.stopping:
                self.health.beat()
                self._idle()
                self.metrics.state_errors.labels(self.role).set(sum(self.state.errors.values()))
                flow.commit_if_allowed()
                if self.paused():
                    consumer.pause(*consumer.assignment())
                elif consumer.paused():
                    consumer.resume(*consumer.paused())
                records = self.broker.retry("poll", lambda: poll_records(consumer, timeout_ms=500), kafka_retriable)
                if consumer.assignment() != assignment:
                    # An idle window counts from the last rebalance: a pattern subscription joins
                    # twice (its topics come from a metadata refresh) and a slow join must not
                    # use up the window before the partitions arrive.
                    assignment = set(consumer.assignment())
                    last_work = time.monotonic()
                    log.info("assigned", role=self.role, partitions=len(assignment))
                self.health.ready = self._ready(bool(assignment))
                if not records:
                    flow.finish()
                    if max_idle_s is not None and time.monotonic() - last_work > max_idle_s:
                        break
                    continue
                last_work = time.monotonic()
                self.metrics.events_in.labels(self.role).inc(len(records))
                flow.start(records, self.state_outage.retry("process", partial(self.process, records), state_unavailable))
            flow.finish()
            self.on_stop()
            flow.commit_if_allowed()
        except Interrupted as e:
            # Stopped while waiting out an outage: nothing more is committed; what was not is redelivered.
            log.warning("stopped_during_outage", role=self.role, error=str(e))
        finally:
            self.health.ready = False
            consumer.close(timeout_ms=5000)  # leaves the group so the partitions move on at once
            flow.recorder.shutdown(wait=True)
            flow.producer.close(timeout=5)
            lag.close()
            self.health.close()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            gc.set_threshold(*gc_threshold)
            gc.unfreeze()
            log.info("stopped", role=self.role)


_Undelivered = tuple[list[OutRecord], BaseException | None]


class Pipeline:
    """One batch in flight: batch n's outputs travel to the broker, are acknowledged and recorded
    (its ``on_ack`` steps, on the recorder thread) while batch n+1 is processed.

    A batch's offsets are committed only after its outputs were acknowledged and its ``on_ack``
    and ``after_produce`` steps ran; batches complete in order.
    """

    def __init__(self, worker: Worker, make_producer: Callable[[], KafkaProducer]) -> None:
        self.worker = worker
        self._make_producer = make_producer
        self.producer = make_producer()
        self.consumer: KafkaConsumer | None = None
        self.recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recorder")  # one thread: batch order
        # The batch's records, its result, its acknowledgement, when it started, the producer it went to.
        self.in_flight: tuple[list[ConsumerRecord], BatchResult, Future[_Undelivered], float, KafkaProducer] | None = None
        self.uncommitted: list[ConsumerRecord] = []

    def start(self, records: list[ConsumerRecord], result: BatchResult) -> None:
        started = time.perf_counter()
        delivery = send_each(self.producer, result.records)
        self.finish()
        self.in_flight = (records, result, self.recorder.submit(self._acknowledged, delivery, result), started, self.producer)

    @staticmethod
    def _acknowledged(delivery: Delivery, result: BatchResult) -> _Undelivered:
        failed, error = undelivered(delivery, timeout_s=ACK_TIMEOUT_S)
        if not failed:
            for step in result.on_ack:
                step()
        return failed, error

    def finish(self, commit: bool = True) -> None:
        if self.in_flight is None:
            return
        records, result, recorded, started, sent_on = self.in_flight
        self.in_flight = None
        failed, error = recorded.result()
        if failed:  # sent again until acknowledged; nothing of the batch is committed before
            self.redeliver(failed, error, sent_on)
            for step in result.on_ack:
                step()
        for step in result.after_produce:
            step()
        self.uncommitted.extend(records)
        if commit:
            self.commit_if_allowed()
        self.worker.metrics.batch_seconds.labels(self.worker.role).observe(time.perf_counter() - started)

    def redeliver(self, records: list[OutRecord], error: BaseException | None, sent_on: KafkaProducer) -> None:
        """Send ``records`` again (only those not acknowledged) until the broker acknowledges them all."""
        # Records of a producer replaced since failed with it (aborted, or its fatal state).
        replaced = sent_on is not self.producer
        if error is None or not (replaced or kafka_retriable(error) or producer_broken(sent_on)):
            raise ProduceError(f"{len(records)} records failed: {error!r}") from error
        log.warning("produce_failed_resending", role=self.worker.role, records=len(records), error=repr(error)[:300])
        if not replaced:
            self._replace_producer_if_needed(error, 0)
        pending = records

        def attempt() -> None:
            nonlocal pending
            pending, err = undelivered(send_each(self.producer, pending), timeout_s=ACK_TIMEOUT_S)
            if pending:
                raise ProduceError(f"{len(pending)} records not acknowledged: {err!r}") from err

        self.worker.broker.retry("produce", attempt, self._retriable, on_failure=self._replace_producer_if_needed)

    def _retriable(self, error: BaseException) -> bool:
        return kafka_retriable(error) or producer_broken(self.producer)

    def _replace_producer_if_needed(self, error: BaseException, attempt: int) -> None:
        """A fenced or broken producer (a restarted broker forgot its id) or one failing for a while is replaced."""
        fenced = producer_fenced(error) or producer_broken(self.producer)
        if not fenced and (attempt + 1) % _RECREATE_PRODUCER_EVERY:
            return
        old = self.producer
        self.producer = self._make_producer()
        # Its unsent batches are aborted: they belong to batches that are sent again (by finish).
        old.close(timeout=0)
        log.warning("producer_recreated", role=self.worker.role, fenced=fenced, error=repr(error)[:300])

    def commit_if_allowed(self) -> None:
        if not self.uncommitted or self.consumer is None or not self.worker.should_commit():
            return
        # Offsets of partitions that moved to another member in a rebalance are not ours to commit:
        # the new owner re-reads those records, and the idempotency record (written before the
        # partitions moved) keeps it from deciding them again.
        owned = self.consumer.assignment()
        mine = [r for r in self.uncommitted if TopicPartition(r.topic, r.partition) in owned]
        self.uncommitted = []
        if not mine:
            return
        consumer = self.consumer
        try:
            self.worker.broker.retry("commit", lambda: commit_batch(consumer, mine), commit_retriable)
        except _REBALANCING as e:
            # Safe to drop: a later commit on a partition still ours covers these offsets, and
            # whoever re-reads them finds them decided already.
            log.warning("commit_skipped_rebalance", role=self.worker.role, records=len(mine), error=type(e).__name__)


class _FinishOnRevoke(ConsumerRebalanceListener):
    """Before partitions move to another member, get the batch in flight acknowledged and recorded.

    kafka-python 3 runs this on the consumer's IO thread, where the consumer itself must not be
    called (a commit there raises), so the offsets are committed by the loop after the rebalance.
    """

    def __init__(self, flow: Pipeline) -> None:
        self.flow = flow

    def on_partitions_revoked(self, revoked: object) -> None:
        self.flow.finish(commit=False)

    def on_partitions_assigned(self, assigned: object) -> None:
        pass
