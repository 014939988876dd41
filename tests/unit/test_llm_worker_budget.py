"""The LLM worker's budget handling, driven batch by batch (memory state, recorded answers)."""

from __future__ import annotations

import json

import pytest

from cascade.config import load_config
from cascade.messages import Decision, Deferred, Demonstration, Event, TierOutput
from tests.records import Rec
from workers.llm_worker import LLMWorker

LLM = "test-llm"




def deferred(i: int, warm: bool = True) -> Rec:
    out = TierOutput(tier="logistic", version=300, probs=[0.8, 0.2], policy_features=[0.8], p_agree=0.5 if warm else None)
    d = Deferred(event=Event(id=f"e{i}", text=f"text number {i}", payload={"llm": {LLM: "joy"}}), outputs=[out], cost=1.0)
    return Rec("cascade.llm", 0, i, d.event.id.encode(), d.model_dump_json().encode())


def worker(on_exhausted: str) -> LLMWorker:
    config = load_config(None, task={"labels": ["fear", "joy"]}, llm={"name": LLM},
                         budget={"calls_per_hour": 5, "on_exhausted": on_exhausted, "pace": False})
    return LLMWorker(config, metrics_port=0)


def outputs(result, topic_suffix: str) -> list[dict]:
    return [json.loads(r.value) for r in result.records if r.topic.endswith(topic_suffix)]


def test_exhausted_budget_answers_with_the_cheap_tier():
    w = worker("cheap_tier")
    try:
        result = w.process([deferred(i) for i in range(8)])
        decisions = [Decision.model_validate(d) for d in outputs(result, "decisions")]
        assert len(decisions) == 8
        assert sum(d.reason == "llm" for d in decisions) == 5
        fallback = [d for d in decisions if d.reason == "budget_exhausted"]
        assert len(fallback) == 3 and all(d.label == "fear" and d.tier == "logistic" for d in fallback)
        assert len(outputs(result, "demonstrations")) == 5
        assert not w.paused()
    finally:
        w.health.close()


def test_exhausted_budget_holds_events_on_the_llm_topic():
    w = worker("hold")
    try:
        batch = [deferred(i) for i in range(8)]
        result = w.process(batch)
        assert len(outputs(result, "decisions")) == 5
        held = [r for r in result.records if r.topic == "cascade.llm"]
        assert sorted(r.value for r in held) == sorted(r.value for r in batch[5:])  # requeued as they were
        assert w.paused()  # no fetching until the window rolls over
        [Demonstration.model_validate(d) for d in outputs(result, "demonstrations")]
    finally:
        w.health.close()


@pytest.mark.parametrize("on_exhausted", ["cheap_tier", "hold"])
def test_redelivered_events_are_not_answered_twice(on_exhausted):
    w = worker(on_exhausted)
    try:
        first = w.process([deferred(1)])
        for step in [*first.on_ack, *first.after_produce]:  # what the loop runs once the broker acknowledged
            step()
        again = w.process([deferred(1)])
        assert outputs(again, "decisions") == [] and w.metrics.duplicates.labels("llm")._value.get() == 1
    finally:
        w.health.close()


def test_budget_is_exported_as_metrics():
    w = worker("cheap_tier")
    try:
        w.process([deferred(i) for i in range(3)])
        assert w.metrics.budget_limit.labels("llm", "calls_per_hour")._value.get() == 5
        assert w.metrics.budget_remaining.labels("llm", "calls_per_hour")._value.get() == 2
    finally:
        w.health.close()


def test_audits_are_demonstrations_not_decisions_and_steer_the_live_parameters():
    from cascade.messages import ContractTally

    config = load_config(None, task={"labels": ["fear", "joy"]}, llm={"name": LLM},
                         contract={"min_agreement": 0.9, "update_every": 5})
    w = LLMWorker(config, metrics_port=0)
    try:
        recs = []
        for i in range(6):  # the tier answered "fear" (its top class); the LLM says "joy": disagreements
            d = Deferred.model_validate_json(deferred(i).value)
            tally = ContractTally(tier="logistic", answered=10, risk=[0.1 * k for k in range(10)], p_agree=[0.9] * 10)
            audit = d.model_copy(update={"audit": True, "tally": tally})
            recs.append(Rec("cascade.llm", 0, i, audit.event.id.encode(), audit.model_dump_json().encode()))
        result = w.process(recs)
        assert outputs(result, "decisions") == []
        assert len(outputs(result, "demonstrations")) == 6
        assert w.metrics.audit_calls.labels("llm")._value.get() == 6
        est = w.contract.estimate()  # type: ignore[union-attr]
        assert est.audit_calls == 6 and est.tiers["logistic"].answers == 60 and est.tiers["logistic"].audit_agreements == 0
        params = w.state.get_live_params()
        assert params is not None and "logistic" in params.thresholds  # written for the tier workers to follow
    finally:
        w.health.close()
