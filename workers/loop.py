"""The loop every worker runs: poll a batch, process it, produce the outputs, wait for the
broker's acknowledgement, record what was decided, and only then commit the input offsets.

At-least-once: a crash anywhere before the commit redelivers the batch; the idempotency
record (event ids already decided) keeps the redelivery from producing a second decision.
SIGTERM finishes the batch in flight, commits, and leaves the group.
"""

from __future__ import annotations

import base64
import signal
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from kafka.consumer.fetcher import ConsumerRecord

from cascade.config import CascadeConfig
from cascade.logging import get_logger
from cascade.messages import DeadLetter
from workers.kafka_io import LagProbe, OutRecord, commit_batch, ensure_topics, make_consumer, make_producer, poll_records, produce_and_flush
from workers.observability import HealthServer, WorkerMetrics
from workers.topics import Topics

log = get_logger("cascade.worker")


@dataclass
class BatchResult:
    records: list[OutRecord] = field(default_factory=list)
    # Runs after the broker acknowledged ``records`` and before the offsets are committed.
    after_produce: list[Callable[[], None]] = field(default_factory=list)


def dead_letter(topics: Topics, stage: str, rec: ConsumerRecord, reason: str, detail: str) -> OutRecord:
    key = rec.key.decode("utf-8", "replace") if rec.key else None
    msg = DeadLetter(
        reason=reason, detail=detail[:2000], stage=stage, source_topic=rec.topic, partition=rec.partition,
        offset=rec.offset, key=key, original_b64=base64.b64encode(rec.value or b"").decode("ascii"),
    )
    return OutRecord(topics.deadletter, rec.key, msg.model_dump_json().encode())


class Worker:
    """Consume-process-produce-commit for one role; subclasses implement ``process``."""

    role: str = "worker"

    def __init__(self, config: CascadeConfig, input_topics: Sequence[str], group: str, metrics_port: int | None = None) -> None:
        self.config = config
        self.topics = Topics(config)
        self.input_topics = list(input_topics)
        self.group = group
        self.metrics = WorkerMetrics(self.role)
        port = config.server.metrics_port if metrics_port is None else metrics_port
        self.health = HealthServer(self.metrics, port)
        self.stopping = False
        self._lag_checked = 0.0

    def process(self, records: list[ConsumerRecord]) -> BatchResult:
        raise NotImplementedError

    def idle(self) -> None:
        """Between polls: hot-swap models, refresh live parameters."""

    def on_stop(self) -> None:
        """Before the final commit on shutdown (the learner publishes what it learned)."""

    def paused(self) -> bool:
        """While True the worker stays in its group but fetches nothing (the LLM worker holding for budget)."""
        return False

    def should_commit(self) -> bool:
        """Whether everything consumed so far may be committed now (the learner waits for a snapshot)."""
        return True

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("stopping", role=self.role, signal=signal.Signals(signum).name)
        self.stopping = True

    def _sample_lag(self, probe: LagProbe) -> None:
        now = time.monotonic()
        if now - self._lag_checked < 10.0:
            return
        self._lag_checked = now
        try:
            lag = sum(probe.lag(self.group, self.input_topics).values())
            self.metrics.lag.labels(self.role).set(lag)
        except Exception as e:  # lag is for dashboards; never stop answering for it
            log.warning("lag_probe_failed", error=str(e))

    def run(self, max_idle_s: float | None = None) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        kcfg = self.config.kafka
        ensure_topics(kcfg.bootstrap_servers, self.topics.all(), kcfg.partitions, kcfg.replication_factor)
        producer = make_producer(kcfg, client_id=f"{self.group}-producer")
        consumer = make_consumer(kcfg, self.group, self.input_topics, client_id=f"{self.group}-consumer")
        probe = LagProbe(kcfg.bootstrap_servers)
        log.info("started", role=self.role, group=self.group, topics=self.input_topics, metrics_port=self.health.port)
        last_work = time.monotonic()
        uncommitted: list[ConsumerRecord] = []
        try:
            while not self.stopping:
                self.health.beat()
                self.idle()
                if uncommitted and self.should_commit():
                    commit_batch(consumer, uncommitted)
                    uncommitted = []
                if self.paused():
                    consumer.pause(*consumer.assignment())
                elif consumer.paused():
                    consumer.resume(*consumer.paused())
                records = poll_records(consumer, timeout_ms=500)
                if consumer.assignment():
                    self.health.ready = True
                self._sample_lag(probe)
                if not records:
                    if max_idle_s is not None and time.monotonic() - last_work > max_idle_s:
                        break
                    continue
                last_work = time.monotonic()
                started = time.perf_counter()
                self.metrics.events_in.labels(self.role).inc(len(records))
                result = self.process(records)
                produce_and_flush(producer, result.records)
                for step in result.after_produce:
                    step()
                uncommitted.extend(records)
                if self.should_commit():
                    commit_batch(consumer, uncommitted)
                    uncommitted = []
                self.metrics.batch_seconds.labels(self.role).observe(time.perf_counter() - started)
            self.on_stop()
            if uncommitted and self.should_commit():
                commit_batch(consumer, uncommitted)
        finally:
            self.health.ready = False
            consumer.close()  # leaves the group so the partitions move on at once
            producer.close()
            probe.close()
            self.health.close()
            log.info("stopped", role=self.role)
