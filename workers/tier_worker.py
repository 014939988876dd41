"""`cascade worker --tier NAME`: one cheap tier as a Kafka consumer group of its own."""

from __future__ import annotations

import os
import time
from collections import Counter

from kafka.consumer.fetcher import ConsumerRecord
from pydantic import ValidationError

from cascade.config import CascadeConfig
from cascade.logging import get_logger
from cascade.messages import Decision, Deferred, RoutingSnapshot
from cascade.routing.cascade import build_stage, deferral_costs
from cascade.routing.stage import Action, Stage
from cascade.state.base import StateStore
from cascade.state.keys import cache_keys
from cascade.task import InvalidEvent, Task
from workers.kafka_io import OutRecord
from workers.loop import BatchResult, Worker, dead_letter
from workers.topics import Topics

log = get_logger("cascade.worker.tier")


def model_names(tier: str) -> tuple[str, str]:
    """Registry names of a tier's model and its deferral policy."""
    return f"tier:{tier}", f"policy:{tier}"


def load_latest(state: StateStore, stage: Stage) -> dict[str, int]:
    """Restore a stage's tier and policy from the newest registry versions; returns what it loaded."""
    loaded = {}
    for name, target in zip(model_names(stage.tier.name), (stage.tier, stage.policy)):
        found = state.fetch(name)
        if found is not None:
            target.restore(found[1])
            loaded[name] = found[0]
    return loaded


class ModelFollower:
    """Hot-swaps a stage's models and the live parameters when new versions appear in the state store."""

    def __init__(self, state: StateStore, stage: Stage, metrics_role: str, metrics: object, every_s: float = 1.0) -> None:
        self.state = state
        self.stage = stage
        self.names = model_names(stage.tier.name)
        self.watcher = state.watcher(self.names, poll_interval_s=every_s, known=load_latest(state, stage))
        self.every_s = every_s
        self._params_at = 0.0
        self.metrics = metrics
        self.role = metrics_role

    def poll(self) -> None:
        for name, version in self.watcher.changed().items():
            found = self.state.fetch(name, version)
            if found is None:
                continue
            target = self.stage.tier if name == self.names[0] else self.stage.policy
            target.restore(found[1])
            self.metrics.snapshots.labels(self.role, name, "load").inc()  # type: ignore[attr-defined]
            self.metrics.model_version.labels(self.role, name).set(found[0])  # type: ignore[attr-defined]
            log.info("model_swapped", name=name, version=found[0])
        now = time.monotonic()
        if now - self._params_at >= self.every_s:
            self._params_at = now
            params = self.state.get_live_params()
            if params is not None and params != self.stage.params:
                self.stage.params = params
                log.info("live_params_applied", mu=params.mu, thresholds=params.thresholds)


class TierWorker(Worker):
    def __init__(self, config: CascadeConfig, tier: str, metrics_port: int | None = None) -> None:
        self.role = f"tier-{tier}"
        names = [t.name for t in config.tiers]
        if tier not in names:
            raise ValueError(f"unknown tier {tier!r}; configured tiers: {names}")
        topics = Topics(config)
        super().__init__(config, [topics.input_of(tier)], topics.group(self.role), metrics_port)
        self.task = Task(config.task)
        self.stage = build_stage(config, names.index(tier))
        self.stage.rng.seed(config.seed * 1_000_003 + os.getpid())  # replicas must not explore in lockstep
        self.first = names.index(tier) == 0
        self.follower = ModelFollower(self.state, self.stage, self.role, self.metrics)
        self._routing_at = 0.0

    def share_routing(self) -> None:
        """Publish this stage's routing and take the stages above into its deferral cost."""
        self.state.put_routing(self.stage.routing())
        shared = self.state.get_routing()
        chain = [
            self.stage.routing() if t.name == self.stage.tier.name
            # Unknown stages above count as deferring everything: the cautious assumption.
            else shared.get(t.name) or RoutingSnapshot(tier=t.name, cost=t.cost, answer_rate=0.0, answered_disagreement=0.0)
            for t in self.config.tiers
        ]
        mine = [t.name for t in self.config.tiers].index(self.stage.tier.name)
        self.stage.policy.defer_cost = deferral_costs(chain, self.config.llm.cost)[mine]

    def idle(self) -> None:
        self.follower.poll()
        now = time.monotonic()
        if now - self._routing_at >= 2.0:
            self._routing_at = now
            self.share_routing()

    def _parse(self, rec: ConsumerRecord, res: BatchResult, now: float) -> Deferred | None:
        try:
            if self.first:  # (a time passed in, not a default factory: pydantic calls those slowly)
                return Deferred(event=self.task.parse_event(rec.value, self.config.kafka.max_event_bytes), first_seen=now)
            return Deferred.model_validate_json(rec.value)
        except InvalidEvent as e:
            reason, detail = e.reason, e.detail
        except ValidationError as e:
            reason, detail = "invalid_deferral", str(e)
        res.records.append(dead_letter(self.topics, self.role, rec, reason, detail))
        self.metrics.dead_letters.labels(self.role, reason).inc()
        log.warning("dead_lettered", reason=reason, topic=rec.topic, partition=rec.partition, offset=rec.offset)
        return None

    def process(self, records: list[ConsumerRecord]) -> BatchResult:
        res = BatchResult()
        items: dict[str, Deferred] = {}
        now = time.time()
        for rec in records:
            d = self._parse(rec, res, now)
            if d is not None and d.event.id not in items:  # a repeat inside one batch is a duplicate
                items[d.event.id] = d
            elif d is not None:
                self.metrics.duplicates.labels(self.role).inc()
        ids = list(items)
        if self.first:  # the cache answers before any tier runs; events passed up were looked up there already
            fresh = self.undecided_with_cache(ids, cache_keys(self.task.name, self.task.labels, [items[i].event.text for i in ids]))
        else:
            fresh = [(i, None) for i in self.undecided(ids)]
        self.metrics.duplicates.labels(self.role).inc(len(ids) - len(fresh))
        decided: list[Decision] = [hit for _, hit in fresh if hit is not None]
        todo = [items[i] for i, hit in fresh if hit is None]
        self.metrics.cache_hits.labels(self.role).inc(len(decided))
        tier = self.stage.tier
        deferred: Counter[tuple[str, bool]] = Counter()
        latency = self.metrics.event_latency.labels(self.role)
        if todo:
            routed = self.stage.route([d.event for d in todo], [d.outputs[-1] if d.outputs else None for d in todo])
            versions = {tier.name: tier.version}
            decided_at = time.time()
            for d, r in zip(todo, routed):
                cost = d.cost + tier.cost
                if r.action is Action.ANSWER:
                    decided.append(Decision(
                        event_id=d.event.id, label=r.label, tier=tier.name, confidence=r.confidence, reason="tier",
                        model_versions={**{o.tier: o.version for o in d.outputs}, **versions}, cost=cost, ts=decided_at,
                    ))
                    latency.observe(decided_at - d.first_seen)
                    continue
                explored = r.action is Action.EXPLORE
                to = self.topics.llm if explored else self.topics.above(tier.name)
                up = Deferred(event=d.event, outputs=[*d.outputs, r.output], explored=d.explored or explored,
                              cost=cost, first_seen=d.first_seen)
                res.records.append(OutRecord(to, d.event.id.encode(), up.model_dump_json().encode()))
                deferred[to, explored] += 1
        # Metrics by the batch: a labels() lookup per event costs more than the tier's features.
        for (to, explored), n in deferred.items():
            self.metrics.deferred.labels(self.role, to, str(explored).lower()).inc(n)
        for (tier_name, reason), n in Counter((d.tier, d.reason) for d in decided).items():
            self.metrics.answered.labels(self.role, tier_name, reason).inc(n)
        res.records.extend(
            OutRecord(self.topics.decisions, d.event_id.encode(), d.model_dump_json().encode()) for d in decided
        )
        self.record_decided(res, [d.event_id for d in decided])
        if decided and self.config.state.cache_cheap_answers:
            answered = [d for d in decided if d.reason == "tier"]
            answered_keys = cache_keys(self.task.name, self.task.labels, [items[d.event_id].event.text for d in answered])
            res.on_ack.append(lambda: self.state.put_decisions(zip(answered_keys, answered)))
        return res


