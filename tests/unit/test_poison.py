"""Poison events: each is dead-lettered or handled, the worker stays up, the others are decided."""

from __future__ import annotations

import base64
import hashlib
import json

from cascade.config import load_config
from cascade.messages import DeadLetter, Decision, Deferred, Event, TierOutput
from tests.records import Rec
from workers.llm_worker import LLMWorker
from workers.loop import DEAD_LETTER_MAX_BYTES, dead_letter
from workers.topics import Topics

LLM = "test-llm"




def outputs(result, topic_suffix: str) -> list[dict]:
    return [json.loads(r.value) for r in result.records if r.topic.endswith(topic_suffix)]


def test_a_dead_letter_too_large_for_a_request_is_truncated_not_dropped():
    config = load_config(None, task={"labels": ["a", "b"]})
    big = json.dumps({"id": "big", "text": "x" * 1_000_000}).encode()
    out = dead_letter(Topics(config), "tier-x", Rec("cascade.events", 0, 7, b"big", big), "too_large", "detail")
    assert len(out.value) <= DEAD_LETTER_MAX_BYTES
    msg = DeadLetter.model_validate_json(out.value)
    assert msg.truncated and msg.reason == "too_large" and msg.original_size == len(big)
    assert msg.original_sha256 == hashlib.sha256(big).hexdigest()
    head = base64.b64decode(msg.original_b64)
    assert head and big.startswith(head)
    small = dead_letter(Topics(config), "tier-x", Rec("cascade.events", 0, 8, None, b"{}"), "not_an_object", "")
    msg = DeadLetter.model_validate_json(small.value)
    assert not msg.truncated and base64.b64decode(msg.original_b64) == b"{}" and msg.original_size == 2


def test_a_recorded_answer_that_is_not_a_string_is_unusable_not_a_crash():
    config = load_config(None, task={"labels": ["fear", "joy"]}, llm={"name": LLM})
    w = LLMWorker(config, metrics_port=0)
    try:
        recs = []
        for i, answer in enumerate(["joy", 5, None, ["joy"], {"a": 1}, True, 1.5]):
            out = TierOutput(tier="logistic", version=300, probs=[0.8, 0.2], policy_features=[0.8], p_agree=0.5)
            d = Deferred(event=Event(id=f"e{i}", text=f"text {i}", payload={"llm": {LLM: answer}}), outputs=[out])
            recs.append(Rec("cascade.llm", 0, i, d.event.id.encode(), d.model_dump_json().encode()))
        result = w.process(recs)
        decisions = {d["event_id"]: Decision.model_validate(d) for d in outputs(result, "decisions")}
        assert len(decisions) == 7 and not outputs(result, "deadletter")
        assert decisions["e0"].label == "joy" and decisions["e0"].reason == "llm"
        assert all(decisions[f"e{i}"].reason == "llm_unusable" for i in range(1, 7))
    finally:
        w.health.close()


def event_rec(i: int, text: str, event_id: str | None = None) -> Rec:
    eid = event_id or f"ev{i}"
    return Rec("cascade.events", 0, i, eid.encode(), json.dumps({"id": eid, "text": text}).encode())


def tier_worker():
    from tests.unit.test_engine import make_config
    from workers.tier_worker import TierWorker

    config = make_config()
    return TierWorker(config, config.tiers[0].name, metrics_port=0)


def decided_ids(result) -> list[str]:
    """Each event's one output: its decision, its deferral, or its dead letter."""
    out = [d["event_id"] for d in outputs(result, "decisions")]
    out += [r.key.decode() for r in result.records if not r.topic.endswith(("decisions", "deadletter", "demonstrations"))]
    return out


def test_an_event_that_breaks_a_batch_is_dead_lettered_alone(monkeypatch):
    import workers.tier_worker as tw

    real = tw.route_stage

    def fragile(stage, todo, now):
        if any("boom" in d.event.text for d in todo):
            raise RuntimeError("the featurizer fell over")
        return real(stage, todo, now)

    monkeypatch.setattr(tw, "route_stage", fragile)
    w = tier_worker()
    try:
        recs = [event_rec(i, f"fine text {i}") for i in range(10)]
        recs.insert(4, event_rec(99, "this goes boom"))
        result = w.process(recs)
        [letter] = [DeadLetter.model_validate(d) for d in outputs(result, "deadletter")]
        assert letter.reason == "processing_error" and "the featurizer fell over" in letter.detail and letter.offset == 99
        assert sorted(decided_ids(result)) == sorted(f"ev{i}" for i in range(10))
        assert not w._deciding - {f"ev{i}" for i in range(10)}
    finally:
        w.health.close()


def test_a_text_with_nul_is_decided_like_any_other():
    w = tier_worker()
    try:
        recs = [event_rec(i, f"fine text {i}") for i in range(5)] + [event_rec(5, "nul\x00inside"), event_rec(6, "\x00")]
        result = w.process(recs)
        assert not outputs(result, "deadletter")
        assert sorted(decided_ids(result)) == sorted(f"ev{i}" for i in range(7))
    finally:
        w.health.close()


def test_an_id_seen_again_with_another_text_is_dead_lettered_as_a_conflict():
    w = tier_worker()
    try:
        # Decided before (by whichever worker: a cold tier defers them all, the LLM worker decides).
        from cascade.state.keys import text_mark

        w.state.claim_events([f"ev{i}" for i in range(5)], marks=[text_mark(f"fine text {i}") for i in range(5)])
        # ev1 again (a redelivery: same text, differing only in case and spacing), ev2 with another
        # text, ev7 twice in one batch with two texts, ev8 twice with the same text.
        again = [event_rec(1, "Fine  TEXT 1"), event_rec(2, "something else entirely"), event_rec(7, "seven"),
                 event_rec(17, "not seven", event_id="ev7"), event_rec(8, "eight"), event_rec(18, "eight", event_id="ev8")]
        result = w.process(again)
        letters = [DeadLetter.model_validate(d) for d in outputs(result, "deadletter")]
        assert sorted((d.reason, d.offset) for d in letters) == [("id_conflict", 2), ("id_conflict", 17)]
        assert sorted(decided_ids(result)) == ["ev7", "ev8"]
    finally:
        w.health.close()


def test_the_llm_worker_records_the_text_mark_of_what_it_decided():
    from cascade.state.keys import text_mark

    config = load_config(None, task={"labels": ["fear", "joy"]}, llm={"name": LLM})
    w = LLMWorker(config, metrics_port=0)
    try:
        d = Deferred(event=Event(id="x1", text="Some Text", payload={"llm": {LLM: "joy"}}))
        result = w.process([Rec("cascade.llm", 0, 0, b"x1", d.model_dump_json().encode())])
        for step in [*result.on_ack, *result.after_produce]:
            step()
        assert w.state.marks(["x1", "x2"]) == [text_mark("some   text"), None]
    finally:
        w.health.close()
