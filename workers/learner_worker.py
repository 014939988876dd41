"""`cascade learner`: learns every tier and policy from the demonstrations topic and publishes
snapshots to the model registry every N demonstrations or T seconds.

Offsets are committed only together with a published snapshot, so a learner that dies
restarts from the newest snapshot and re-reads exactly the demonstrations it did not include.
"""

from __future__ import annotations

import time

from kafka.consumer.fetcher import ConsumerRecord
from pydantic import ValidationError

from cascade.config import CascadeConfig
from cascade.learning.learner import Learner
from cascade.learning.registry import load_latest, publish_stage
from cascade.logging import get_logger
from cascade.messages import Demonstration, Event
from cascade.routing.build import build_stages
from workers.loop import BatchResult, Worker, dead_letter
from workers.topics import Topics

log = get_logger("cascade.learner")


class LearnerWorker(Worker):
    role = "learner"

    def __init__(self, config: CascadeConfig, metrics_port: int | None = None,
                 publish_every: int = 200, publish_interval_s: float = 5.0) -> None:
        topics = Topics(config)
        super().__init__(config, [topics.demonstrations], topics.group("learner"), metrics_port)
        self.stages = build_stages(config)
        for stage in self.stages:
            loaded = load_latest(self.state, stage)
            if loaded:
                log.info("resumed_from_registry", **loaded)
        self.learner = Learner(self.stages)
        self.publish_every = publish_every
        self.publish_interval_s = publish_interval_s
        self.unpublished = 0
        self.published_at = time.monotonic()

    def due(self) -> bool:
        return self.unpublished > 0 and (
            self.unpublished >= self.publish_every or time.monotonic() - self.published_at >= self.publish_interval_s
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
        for stage in self.stages:
            for name, version in publish_stage(self.state, stage).items():
                self.metrics.snapshots.labels(self.role, name, "publish").inc()
                self.metrics.model_version.labels(self.role, name).set(version)
        log.info("published", demonstrations=self.learner.demonstrations,
                 versions={s.tier.name: s.tier.version for s in self.stages})
        self.unpublished = 0
        self.published_at = time.monotonic()

    def process_batch(self, records: list[ConsumerRecord]) -> BatchResult:
        res = BatchResult()
        demos = []
        for rec in records:
            try:
                demos.append(Demonstration.model_validate_json(rec.value))
            except ValidationError as e:
                res.records.append(dead_letter(self.topics, self.role, rec, "invalid_demonstration", str(e)))
                self.metrics.dead_letters.labels(self.role, "invalid_demonstration").inc()
        if demos:
            self.learner.learn([Event(id=d.event_id, text=d.text) for d in demos], [d.llm_label for d in demos])
            self.unpublished += len(demos)
            self.metrics.demonstrations.labels(self.role).inc(len(demos))
        if self.due():
            res.after_produce.append(self.publish)
        return res
