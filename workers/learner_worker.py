"""`cascade learner`: learns every tier and policy from the demonstrations topic and publishes
them to the model registry as one set every N demonstrations or T seconds.

Exactly once: each set records, per partition, the next demonstration offset to learn
(``cascade.learning.resume``). On start the learner waits for the registry (a learner that
started afresh while Redis was away would publish untrained models), restores the current
set and skips every demonstration that set already includes, whatever the Kafka commit says.
Offsets are committed only after a publish that includes them. A publish never raises: one
that fails is retried at the next publish point, one refused as stale reloads the newer set.
"""

from __future__ import annotations

import os
import time

from kafka.consumer.fetcher import ConsumerRecord
from pydantic import ValidationError

from cascade.config import CascadeConfig
from cascade.learning.learner import Learner
from cascade.learning.resume import LearnerProgress, SetPublisher
from cascade.logging import get_logger
from cascade.messages import Demonstration, Event
from cascade.routing.build import build_stages
from cascade.state import StateUnavailable
from workers.loop import BatchResult, Worker, dead_letter
from workers.topics import Topics

log = get_logger("cascade.learner")

# Test hook: exit at once (as kill -9 would) right after the N-th successful publish, before the
# offsets it includes are committed: the e2e test's deterministic "crash between publish and commit".
KILL_AFTER_PUBLISH_ENV = "CASCADE_TEST_LEARNER_KILL_AFTER_PUBLISH"


class LearnerWorker(Worker):
    role = "learner"

    def __init__(self, config: CascadeConfig, metrics_port: int | None = None,
                 publish_every: int = 200, publish_interval_s: float = 5.0, registry_wait_cap_s: float = 5.0) -> None:
        topics = Topics(config)
        super().__init__(config, [topics.demonstrations], topics.group("learner"), metrics_port)
        self.stages = build_stages(config)
        self.learner = Learner(self.stages)
        self.progress = LearnerProgress(topics.demonstrations)
        self.publisher = SetPublisher(self.state, self.stages, self.learner, self.progress)
        self.publish_every = publish_every
        self.publish_interval_s = publish_interval_s
        self.unpublished = 0
        self.published_at = time.monotonic()
        self.retry_at = 0.0  # after a failed publish, none before this (monotonic) time
        self.publishes = 0
        self.kill_after = int(os.environ.get(KILL_AFTER_PUBLISH_ENV) or 0)
        self._wait_for_registry(registry_wait_cap_s)

    def _wait_for_registry(self, cap_s: float) -> None:
        """Load the current set, waiting as long as the registry is unreachable."""
        delay, since = 0.2, time.monotonic()
        while True:
            try:
                loaded = self.publisher.load()
                break
            except StateUnavailable as e:
                log.warning("waiting_for_registry", error=str(e), waited_s=round(time.monotonic() - since, 1),
                            retry_in_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, cap_s)
        for name, (version, _) in loaded.models.items():
            self.metrics.snapshots.labels(self.role, name, "load").inc()
            self.metrics.model_version.labels(self.role, name).set(version)
        self.metrics.demonstrations.labels(self.role).inc(0)  # exported from the start
        log.info("registry_loaded", epoch=loaded.epoch, version=loaded.version,
                 demonstrations=self.learner.demonstrations, offsets=self.progress.offsets)

    def due(self) -> bool:
        now = time.monotonic()
        return self.unpublished > 0 and now >= self.retry_at and (
            self.unpublished >= self.publish_every or now - self.published_at >= self.publish_interval_s
        )

    def should_commit(self) -> bool:
        return self.unpublished == 0

    def on_stop(self) -> None:
        if self.unpublished:
            self.publish()

    def idle(self) -> None:
        if self.due():
            self.publish()

    def publish(self) -> None:
        """Publish the set; never raises (a failure leaves the offsets uncommitted and is retried)."""
        stale_before = self.publisher.stale
        published = self.publisher.publish()
        if published is None:
            stale = self.publisher.stale > stale_before
            self.metrics.snapshots.labels(self.role, "set", "stale" if stale else "publish_failed").inc()
            # Stale: the newer set is loaded, publish on top of it at once. Unreachable: wait a while.
            self.retry_at = 0.0 if stale else time.monotonic() + self.publish_interval_s
            return
        for name in published.names:
            self.metrics.snapshots.labels(self.role, name, "publish").inc()
            self.metrics.model_version.labels(self.role, name).set(published.version)
        log.info("published", version=published.version, epoch=published.epoch,
                 demonstrations=self.learner.demonstrations, offsets=self.progress.offsets)
        self.unpublished = 0
        self.published_at = time.monotonic()
        self.retry_at = 0.0
        self.publishes += 1
        if self.kill_after and self.publishes >= self.kill_after:
            log.warning("test_hook_exit_after_publish", publishes=self.publishes)
            os._exit(9)

    def process_batch(self, records: list[ConsumerRecord]) -> BatchResult:
        res = BatchResult()
        fresh = [r for r in records if self.progress.fresh(r.partition, r.offset)]
        if len(fresh) < len(records):
            # In the registry's set already (learned before a restart whose commit did not happen).
            self.metrics.duplicates.labels(self.role).inc(len(records) - len(fresh))
            log.info("already_learned_skipped", records=len(records) - len(fresh))
        demos = []
        for rec in fresh:
            try:
                demos.append(Demonstration.model_validate_json(rec.value))
            except ValidationError as e:
                res.records.append(dead_letter(self.topics, self.role, rec, "invalid_demonstration", str(e)))
                self.metrics.dead_letters.labels(self.role, "invalid_demonstration").inc()
        if demos:
            self.learner.learn([Event(id=d.event_id, text=d.text) for d in demos], [d.llm_label for d in demos])
            self.metrics.demonstrations.labels(self.role).inc(len(demos))
        if fresh:
            self.progress.advance((r.partition, r.offset) for r in fresh)
            self.unpublished += len(fresh)
        if self.due():
            res.after_produce.append(self.publish)
        return res
