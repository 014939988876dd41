"""`cascade worker --tier NAME`: one cheap tier as a Kafka consumer group of its own."""

from __future__ import annotations

import os
import time
from collections import Counter

from kafka.consumer.fetcher import ConsumerRecord
from pydantic import ValidationError

from cascade.config import CascadeConfig
from cascade.contract.runtime import Audit, TierTally
from cascade.learning.registry import ModelFollower
from cascade.logging import get_logger
from cascade.messages import Decision, Deferred
from cascade.routing.build import build_stage
from cascade.routing.steps import price_deferral, route_stage
from cascade.state.keys import cache_keys, text_mark
from cascade.task import InvalidEvent, Task
from workers.kafka_io import OutRecord
from workers.loop import BatchResult, Worker, dead_letter
from workers.observability import FreshGroupWatch
from workers.output import OutputRefused, decision_records, origin_of, refusal
from workers.topics import Topics

log = get_logger("cascade.worker.tier")


class TierWorker(Worker):
    def __init__(self, config: CascadeConfig, tier: str, metrics_port: int | None = None) -> None:
        self.role = f"tier-{tier}"
        names = [t.name for t in config.tiers]
        if tier not in names:
            raise ValueError(f"unknown tier {tier!r}; configured tiers: {names}")
        topics = Topics(config)
        self.input_pattern = topics.pattern_of(tier)
        super().__init__(config, topics.inputs_of(tier), topics.group(self.role), metrics_port)
        self.task = Task(config.task)
        self.stage = build_stage(config, names.index(tier))
        self.stage.rng.seed(config.seed * 1_000_003 + os.getpid())  # replicas must not explore in lockstep
        self.first = names.index(tier) == 0
        self.follower = ModelFollower(self.state, self.state, self.stage, on_swap=self._swapped, on_refused=self._refused)
        self._routing_at = 0.0
        self.fresh_watch = FreshGroupWatch()
        # The contract: this worker audits its answers; the LLM worker estimates and steers.
        self.tally = TierTally(config, tier) if config.contract_on else None

    def _swapped(self, name: str, version: int) -> None:
        self.metrics.snapshots.labels(self.role, name, "load").inc()
        self.metrics.model_version.labels(self.role, name).set(version)

    def _refused(self, name: str, version: int) -> None:
        self.metrics.snapshots.labels(self.role, name, "refused").inc()

    def share_routing(self) -> None:
        """Publish this stage's routing and take the stages above into its deferral cost."""
        mine = self.stage.routing()
        self.state.put_routing(mine)
        known = {**self.state.get_routing(), mine.tier: mine}
        costs = price_deferral([(t.name, t.cost) for t in self.config.tiers], known, self.config.llm.cost)
        self.stage.policy.defer_cost = costs[mine.tier]

    def idle(self) -> None:
        self.follower.poll()
        now = time.monotonic()
        if now - self._routing_at >= 2.0:
            self._routing_at = now
            self.share_routing()

    def _parse(self, rec: ConsumerRecord, res: BatchResult, now: float) -> Deferred | None:
        try:
            if self.first:  # (a time passed in, not a default factory: pydantic calls those slowly)
                event = self.task.parse_event(rec.value, self.config.kafka.max_event_bytes)
                refused = refusal(self.config.output, event.payload)  # refused before anything is spent on it
                if refused is not None:
                    raise refused
                # An enriched output keeps the record's key and headers, whichever worker decides.
                origin = origin_of(rec) if self.config.output.mode == "enriched" else None
                return Deferred(event=event, first_seen=now, origin=origin)
            return Deferred.model_validate_json(rec.value)
        except (InvalidEvent, OutputRefused) as e:
            reason, detail = e.reason, e.detail
        except ValidationError as e:
            reason, detail = "invalid_deferral", str(e)
        res.records.append(dead_letter(self.topics, self.role, rec, reason, detail))
        self.metrics.dead_letters.labels(self.role, reason).inc()
        log.warning("dead_lettered", reason=reason, topic=rec.topic, partition=rec.partition, offset=rec.offset)
        return None

    def _conflict(self, rec: ConsumerRecord, res: BatchResult) -> None:
        """An id decided (or seen in this batch) with another text: not a redelivery, not decided twice."""
        res.records.append(dead_letter(self.topics, self.role, rec, "id_conflict", "event id seen before with a different text"))
        self.metrics.dead_letters.labels(self.role, "id_conflict").inc()
        log.warning("dead_lettered", reason="id_conflict", topic=rec.topic, partition=rec.partition, offset=rec.offset)

    def process_batch(self, records: list[ConsumerRecord]) -> BatchResult:
        res = BatchResult()
        items: dict[str, Deferred] = {}
        recs: dict[str, ConsumerRecord] = {}
        now = time.time()
        repeats = 0  # repeats inside the batch
        for rec in records:
            d = self._parse(rec, res, now)
            if d is None:
                continue
            if d.event.id not in items:
                items[d.event.id], recs[d.event.id] = d, rec
            elif self.first and text_mark(d.event.text) != text_mark(items[d.event.id].event.text):
                self._conflict(rec, res)
            else:  # a repeat inside one batch is a duplicate
                repeats += 1
                self.metrics.duplicates.labels(self.role).inc()
        ids = list(items)
        if self.first:  # the cache answers before any tier runs; events passed up were looked up there already
            texts = [items[i].event.text for i in ids]
            fresh, conflicts = self.undecided_checked(ids, cache_keys(self.task.name, self.task.labels, texts), texts)
            for i in conflicts:  # decided before, so never fresh: dead-lettered instead of dropped
                self._conflict(recs[i], res)
            if conflicts:
                ids = [i for i in ids if i not in set(conflicts)]
        else:
            fresh = [(i, None) for i in self.undecided(ids)]
        self.metrics.duplicates.labels(self.role).inc(len(ids) - len(fresh))
        if self.fresh_group and self.fresh_watch.add(len(records), repeats + len(ids) - len(fresh)):
            log.warning("duplicates_on_fresh_group", group=self.group, pipeline=self.config.pipeline,
                        records=self.fresh_watch.records, duplicates=self.fresh_watch.duplicates,
                        hint="this new consumer group reads events this pipeline's state has already decided: "
                             "another deployment with the same pipeline name, or a reset group; name a "
                             "distinct `pipeline` to decide them again")
        decided: list[Decision] = [hit for _, hit in fresh if hit is not None]
        todo = [items[i] for i, hit in fresh if hit is None]
        self.metrics.cache_hits.labels(self.role).inc(len(decided))
        deferred: Counter[tuple[str, bool]] = Counter()
        if todo:
            step = route_stage(self.stage, todo, time.time())
            latency = self.metrics.event_latency.labels(self.role)
            audits: list[Audit | None] = [None] * len(step.answered)
            if self.tally is not None:
                audits = self.tally.observe(step.routing, [j for j, _ in step.answered], [d.event.id for d in todo])
            for (j, decision), audit in zip(step.answered, audits, strict=True):
                decided.append(decision)
                latency.observe(decision.ts - todo[j].first_seen)
                if audit is not None and self.tally is not None:  # the decision is the tier's; the LLM audits a copy
                    d = todo[j]
                    copy = Deferred(event=d.event, outputs=[*d.outputs, step.routing.output(j)], cost=decision.cost,
                                    first_seen=d.first_seen, audit=True, tally=self.tally.take())
                    res.records.append(OutRecord(self.topics.llm, d.event.id.encode(), copy.model_dump_json().encode()))
            above = self.topics.above(self.stage.tier.name)
            for _, up in step.passed:
                to = self.topics.llm if up.explored else above
                res.records.append(OutRecord(to, up.event.id.encode(), up.model_dump_json().encode()))
                deferred[to, up.explored] += 1
        # Metrics by the batch: a labels() lookup per event costs more than the tier's features.
        for (to, explored), n in deferred.items():
            self.metrics.deferred.labels(self.role, to, str(explored).lower()).inc(n)
        for (tier_name, reason), n in Counter((d.tier, d.reason) for d in decided).items():
            self.metrics.answered.labels(self.role, tier_name, reason).inc(n)
        out, refused = decision_records(self.config.output, self.topics, self.role,
                                        ((d, items[d.event_id], recs[d.event_id]) for d in decided))
        res.records.extend(out)
        for why, n in refused.items():
            self.metrics.dead_letters.labels(self.role, why).inc(n)
        self.record_decided(res, [d.event_id for d in decided], [items[d.event_id].event.text for d in decided])
        if decided and self.config.state.cache_cheap_answers:
            answered = [d for d in decided if d.reason == "tier"]
            answered_keys = cache_keys(self.task.name, self.task.labels, [items[d.event_id].event.text for d in answered])
            res.on_ack.append(lambda: self.state.put_decisions(zip(answered_keys, answered)))
        return res


