"""The tier worker's batch step against a real Redis (no broker: records are handed to it directly).

Batches here are larger than the logistic tier's compile threshold, so they run the serving path
(numpy features, compiled weights, batch deferral scores) on a model the in-process cascade learned.
"""

from __future__ import annotations

import json
import time

import pytest

from cascade.learning.registry import model_names
from cascade.messages import Decision, Deferred, LiveParams
from cascade.routing.cascade import Cascade
from cascade.routing.stage import Action
from cascade.state import make_state
from tests.records import Rec
from tests.unit.streams import easy_and_hard
from tests.unit.test_engine import make_config
from workers.loop import BatchResult
from workers.tier_worker import TierWorker

pytestmark = pytest.mark.integration




def records(stream, start: int = 0, id_prefix: str = "ev") -> list[Rec]:
    return [
        Rec("cascade.events", 0, i, f"{id_prefix}{i}".encode(), json.dumps({**e.payload, "id": f"{id_prefix}{i}"}).encode())
        for i, (e, _) in enumerate(stream, start)
    ]


def by_topic(result: BatchResult, suffix: str) -> list[dict]:
    return [json.loads(r.value) for r in result.records if r.topic.endswith(suffix)]


def acknowledged(result: BatchResult) -> None:
    for step in [*result.on_ack, *result.after_produce]:  # what the loop runs once the broker acknowledged
        step()


@pytest.fixture(scope="module")
def warm() -> Cascade:
    cascade = Cascade(make_config(mu=0.1))
    for e, _ in easy_and_hard(2000, seed=21):
        cascade.process([e])
    cascade.set_params(LiveParams(mu=0.1, exploration_scale=0.0))  # no exploration: decisions are deterministic
    return cascade


@pytest.fixture
def worker(redis_url: str, warm: Cascade):
    config = make_config(mu=0.1).model_copy(deep=True)
    config.redis.url = redis_url
    config.redis.key_prefix = f"test-tier-worker-{time.time_ns()}:"
    config.state.backend = "redis"
    config.state.cache_cheap_answers = True
    state = make_state(config)
    stage = warm.stages[0]
    for name, model in zip(model_names(stage.tier.name), (stage.tier, stage.policy)):
        state.publish(name, model.version, model.snapshot())
    state.set_live_params(warm.stages[0].params)
    w = TierWorker(config, config.tiers[0].name, metrics_port=0)
    w.follower.every_s = 0.0
    w.follower.poll()
    assert w.stage.tier.version == stage.tier.version and w.stage.params.exploration_scale == 0.0
    yield w
    w.health.close()


def test_batch_answers_defers_and_records_what_it_decided(worker: TierWorker, warm: Cascade) -> None:
    stream = easy_and_hard(300, seed=22)
    first = worker.process(records(stream))
    decisions = [Decision.model_validate(d) for d in by_topic(first, "decisions")]
    deferred = [Deferred.model_validate(d) for d in by_topic(first, "llm")]
    assert len(decisions) + len(deferred) == len(stream)  # one output per event
    # The serving path (batches) decides as the in-process engine does one event at a time (plain
    # Python features) with the same models.
    one_by_one = [warm.stages[0].route([e]) for e, _ in stream]
    expected = {f"ev{i}": r.labels[0] for i, r in enumerate(one_by_one) if r.actions[0] is Action.ANSWER}
    assert {d.event_id: d.label for d in decisions} == expected
    kind = {f"ev{i}": k for i, (_, k) in enumerate(stream)}
    assert len(expected) > 100 and all(kind[i] == "easy" for i in expected)  # hard events carry no telling word
    assert all(d.reason == "tier" and d.tier == "logistic" for d in decisions)
    # What it passes up carries its output for the next policies, and the event untouched.
    assert all(len(d.outputs) == 1 and len(d.outputs[0].probs) == 2 and d.outputs[0].p_agree is not None for d in deferred)
    texts = {f"ev{i}": e.text for i, (e, _) in enumerate(stream)}
    assert all(d.event.text == texts[d.event.id] for d in deferred)

    # Redelivered while its decisions are in flight, or after they were acknowledged and recorded:
    # no second decision; what was passed up (not decided yet) goes up again.
    in_flight = worker.process(records(stream))
    acknowledged(first)
    assert worker.state.seen([d.event_id for d in decisions]) == [True] * len(decisions)
    after_ack = worker.process(records(stream))
    for redelivered in (in_flight, after_ack):
        assert by_topic(redelivered, "decisions") == []
        assert sorted(d["event"]["id"] for d in by_topic(redelivered, "llm")) == sorted(d.event.id for d in deferred)

    # New events with texts the tier answered are answered from the decision cache.
    repeat = worker.process(records(stream, id_prefix="again"))
    cached = [Decision.model_validate(d) for d in by_topic(repeat, "decisions")]
    assert sorted(d.event_id.removeprefix("again") for d in cached) == sorted(d.event_id.removeprefix("ev") for d in decisions)
    assert all(d.reason == "cache" and d.cost == 0.0 for d in cached)


def test_malformed_records_are_dead_lettered_with_the_batch_answered(worker: TierWorker) -> None:
    stream = easy_and_hard(64, seed=23)
    bad = [Rec("cascade.events", 0, 900, b"x", b"{not json"), Rec("cascade.events", 0, 901, None, b'{"id": "t1"}'),
           Rec("cascade.events", 0, 902, None, json.dumps({"id": "big", "text": "x" * 200_000}).encode())]
    result = worker.process(records(stream[:32]) + bad + records(stream[32:], start=32))
    dead = by_topic(result, "deadletter")
    assert [d["reason"] for d in dead] == ["invalid_json", "missing_text", "too_large"]
    assert [d["offset"] for d in dead] == [900, 901, 902]
    assert len(by_topic(result, "decisions")) + len(by_topic(result, "llm")) == len(stream)
