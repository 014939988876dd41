"""Property: whatever arrives, each worker's per-event path raises nothing and gives every input
exactly one output (a decision, a deferral or a dead letter; the learner: learned or dead-lettered)."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cascade.messages import Deferred, Demonstration, Event, TierOutput
from tests.records import Rec
from tests.unit.test_engine import LLM, make_config
from workers.learner_worker import LearnerWorker
from workers.llm_worker import LLMWorker
from workers.tier_worker import TierWorker

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_ids = itertools.count()




# Any Unicode a JSON document can carry (NUL included, lone surrogates not: they cannot be encoded).
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=10,
)


def uid() -> str:
    return f"p{next(_ids)}"


def rec(topic: str, value: bytes, key: str | None = None) -> Rec:
    return Rec(topic, 0, next(_ids), key.encode() if key else None, value)


@pytest.fixture(scope="module")
def tier():
    config = make_config()
    w = TierWorker(config, config.tiers[0].name, metrics_port=0)
    yield w
    w.health.close()


@pytest.fixture(scope="module")
def llm():
    w = LLMWorker(make_config(), metrics_port=0)
    yield w
    w.health.close()


@pytest.fixture(scope="module")
def learner():
    w = LearnerWorker(make_config(), metrics_port=0, publish_every=10**9, publish_interval_s=1e9)
    yield w
    w.health.close()


def one_output_each(result, n: int) -> None:
    outs = [r for r in result.records if not r.topic.endswith("demonstrations")]
    assert len(outs) == n, [r.topic for r in outs]
    # Handled by the step itself, not by the fallback for unexpected failures.
    assert not [r for r in outs if r.topic.endswith("deadletter") and json.loads(r.value)["reason"] == "processing_error"]
    for step in [*result.on_ack, *result.after_produce]:
        step()


@SETTINGS
@given(raw=st.lists(st.binary(max_size=300), max_size=8),
       events=st.lists(st.tuples(st.one_of(texts, json_values), st.dictionaries(texts, json_values, max_size=3)), max_size=8))
def test_tier_worker_takes_anything(tier, raw, events):
    recs = [rec("cascade.events", b) for b in raw]
    recs += [rec("cascade.events", json.dumps({**extra, "id": uid(), "text": text}).encode()) for text, extra in events]
    one_output_each(tier.process(recs), len(recs))


@SETTINGS
@given(raw=st.lists(st.binary(max_size=300), max_size=6),
       answers=st.lists(st.tuples(texts.filter(str.strip), json_values), max_size=8))
def test_llm_worker_takes_any_answer(llm, raw, answers):
    recs = [rec("cascade.llm", b) for b in raw]
    out = TierOutput(tier="logistic", version=300, probs=[0.5, 0.5], policy_features=[0.5], p_agree=0.5)
    for text, answer in answers:
        d = Deferred(event=Event(id=uid(), text=text, payload={"llm": {LLM: answer}}), outputs=[out])
        recs.append(rec("cascade.llm", d.model_dump_json().encode(), d.event.id))
    one_output_each(llm.process(recs), len(recs))


@SETTINGS
@given(raw=st.lists(st.binary(max_size=300), max_size=6),
       demos=st.lists(st.tuples(texts, st.sampled_from(["fear", "joy"])), max_size=8))
def test_learner_takes_anything(learner, raw, demos):
    recs = [rec("cascade.demonstrations", b) for b in raw]
    for text, label in demos:
        d = Demonstration(event_id=uid(), text=text, llm=LLM, llm_label=label)
        recs.append(rec("cascade.demonstrations", d.model_dump_json().encode()))
    before = learner.learner.demonstrations
    result = learner.process(recs)
    letters = [r for r in result.records if r.topic.endswith("deadletter")]
    assert len(letters) + learner.learner.demonstrations - before == len(recs)
