"""Output modes (workers/output.py): the decision record, the enriched event, collisions, reading back."""

from __future__ import annotations

import base64
import json

import pytest

from cascade.config import ConfigError, OutputConfig, load_config
from cascade.messages import DeadLetter, Decision, Deferred, Event, Origin
from tests.records import Rec
from workers.llm_worker import LLMWorker
from workers.output import (
    COLLISION,
    NOT_AN_OBJECT,
    OutputRefused,
    decision_records,
    origin_of,
    output_record,
    read_decision,
    read_output,
    refusal,
)
from workers.tier_worker import TierWorker
from workers.topics import Topics

LLM = "test-llm"
ENRICHED = OutputConfig(mode="enriched")
HEADERS = [("trace-id", b"\x00\xffabc"), ("source", "bo\u00eete".encode())]


def decision(event_id: str = "T-1", label: str | None = "joy", tier: str = "llm") -> Decision:
    return Decision(event_id=event_id, label=label, tier=tier, confidence=0.75, reason="llm" if tier == "llm" else "tier",
                    model_versions={"logistic": 12}, cost=1.5, ts=1765000000.25)


def item(payload: dict, key: bytes | None = b"user-key", headers=HEADERS, with_origin: bool = True) -> Deferred:
    origin = Origin(key=key, headers=list(headers)) if with_origin else None
    return Deferred(event=Event(id=str(payload.get("id", "T-1")), text=str(payload.get("text", "")), payload=payload),
                    origin=origin)


def config(**output):
    return load_config(None, task={"labels": ["fear", "joy"]}, llm={"name": LLM}, output=output,
                       server={"metrics_port": 0})


def test_decision_mode_is_the_decision_keyed_by_event_id():
    d = decision()
    rec = output_record(OutputConfig(), "decisions", d, item({"id": "T-1", "text": "x"}))
    assert rec.key == b"T-1" and rec.headers is None and rec.topic == "decisions"
    assert Decision.model_validate_json(rec.value) == d
    back = read_output(rec.value, OutputConfig())
    assert back.decision == d and back.event is None


def test_enriched_keeps_the_event_its_key_and_headers_and_puts_the_decision_under_the_field():
    payload = {"id": "T-1", "text": "a happy day", "meta": {"shop": "eu-1", "tags": ["a", "b"]}, "n": 12345678901234567890,
               "price": 9.99, "ok": True, "none": None}
    d = decision()
    rec = output_record(ENRICHED, "decisions", d, item(payload))
    assert rec.key == b"user-key" and rec.headers == HEADERS
    obj = json.loads(rec.value)
    assert obj.pop("cascade") == json.loads(d.model_dump_json())  # label, tier, confidence, reason, versions, ...
    assert obj == payload and list(obj) == list(payload)  # every original field, in order
    back = read_output(rec.value, ENRICHED)
    assert back.decision == d and back.event == payload
    assert read_decision(rec.value, ENRICHED) == d


def test_a_configured_field_name_and_a_null_label():
    out = OutputConfig(mode="enriched", field="_intent")
    d = decision(label=None)
    rec = output_record(out, "decisions", d, item({"id": "T-1", "text": "x"}))
    assert json.loads(rec.value)["_intent"]["label"] is None
    assert read_decision(rec.value, out) == d
    with pytest.raises(ValueError):  # read with the wrong field: not a decision, said so
        read_decision(rec.value, ENRICHED)


def test_unicode_survives_unescaped():
    payload = {"id": "T-\u00e9", "text": "j'ai peur \u2014 \U0001f631 \u6050\u6016"}
    d = decision(event_id="T-\u00e9")
    rec = output_record(ENRICHED, "decisions", d, item(payload))
    assert "\U0001f631".encode() in rec.value and b"\\u" not in rec.value  # UTF-8, as events usually are
    back = read_output(rec.value, ENRICHED)
    assert back.event == payload and back.decision.event_id == "T-\u00e9"


def test_a_collision_is_refused_or_overwritten_as_configured():
    payload = {"id": "T-1", "text": "x", "cascade": {"theirs": 1}}
    assert refusal(ENRICHED, payload) is not None and refusal(ENRICHED, payload).reason == COLLISION
    with pytest.raises(OutputRefused) as e:
        output_record(ENRICHED, "decisions", decision(), item(payload))
    assert e.value.reason == COLLISION and "cascade" in e.value.detail
    over = OutputConfig(mode="enriched", on_collision="overwrite")
    assert refusal(over, payload) is None
    obj = json.loads(output_record(over, "decisions", decision(), item(payload)).value)
    assert obj["cascade"]["event_id"] == "T-1" and "theirs" not in obj["cascade"]
    assert refusal(OutputConfig(), payload) is None  # the decision mode never looks


def test_a_non_object_event_cannot_be_enriched():
    assert refusal(ENRICHED, ["a", "list"]).reason == NOT_AN_OBJECT
    assert refusal(ENRICHED, "text").reason == NOT_AN_OBJECT
    assert refusal(OutputConfig(), ["a"]) is None


def test_without_an_origin_the_key_is_the_event_id():
    # A deferral produced before the output became enriched carries no origin.
    rec = output_record(ENRICHED, "decisions", decision(), item({"id": "T-1", "text": "x"}, with_origin=False))
    assert rec.key == b"T-1" and rec.headers is None and read_output(rec.value, ENRICHED).event == {"id": "T-1", "text": "x"}


def test_origin_round_trips_binary_key_and_headers_through_a_deferral():
    rec = Rec("shop.reviews", 3, 41, b"\xff\x00k", b"{}", headers=[("h", b"\x01\x02"), ("empty", None)])
    d = Deferred(event=Event(id="1", text="t"), origin=origin_of(rec))
    again = Deferred.model_validate_json(d.model_dump_json())
    assert again.origin == Origin(key=b"\xff\x00k", headers=[("h", b"\x01\x02"), ("empty", None)])
    assert origin_of(Rec("t", 0, 0, None, b"{}")) == Origin()


def test_refused_decisions_become_dead_letters_of_their_record():
    cfg = config(mode="enriched")
    topics = Topics(cfg)
    good, bad = item({"id": "a", "text": "x"}), item({"id": "b", "text": "y", "cascade": 1})
    recs = [Rec("in", 0, 1, b"a", b"{}"), Rec("in", 0, 2, b"b", b'{"id": "b"}')]
    out, refused = decision_records(cfg.output, topics, "llm", [(decision("a"), good, recs[0]), (decision("b"), bad, recs[1])])
    assert [r.topic for r in out] == [topics.decisions, topics.deadletter] and refused == {COLLISION: 1}
    dead = DeadLetter.model_validate_json(out[1].value)
    assert dead.reason == COLLISION and dead.offset == 2 and base64.b64decode(dead.original_b64) == b'{"id": "b"}'


def test_config_from_the_environment_and_loud_on_a_dotted_field(monkeypatch):
    monkeypatch.setenv("CASCADE_OUTPUT__MODE", "enriched")
    monkeypatch.setenv("CASCADE_OUTPUT__FIELD", "decision")
    monkeypatch.setenv("CASCADE_OUTPUT__ON_COLLISION", "overwrite")
    out = load_config(None).output
    assert (out.mode, out.field, out.on_collision) == ("enriched", "decision", "overwrite")
    monkeypatch.setenv("CASCADE_OUTPUT__FIELD", "meta.cascade")
    with pytest.raises(ConfigError, match="output.field"):
        load_config(None)
    monkeypatch.setenv("CASCADE_OUTPUT__FIELD", "x")
    monkeypatch.setenv("CASCADE_OUTPUT__MODE", "both")
    with pytest.raises(ConfigError, match="output.mode"):
        load_config(None)


def test_workers_carry_key_and_headers_from_the_first_tier_to_the_llm_decision():
    """No broker: the first tier (cold, so it defers) and the LLM worker hand records along."""
    cfg = config(mode="enriched")
    tier = TierWorker(cfg, cfg.tiers[0].name, metrics_port=0)
    llm = LLMWorker(cfg, metrics_port=0)
    try:
        events = [{"id": f"e{i}", "text": f"we felt glad {i} \u00e9", "extra": {"i": i}, "llm": {LLM: "joy"}}
                  for i in range(3)]
        taken = {"id": "e9", "text": "afraid", "cascade": "theirs", "llm": {LLM: "fear"}}
        recs = [Rec("shop.reviews", 0, i, f"k{i}".encode(), json.dumps(e).encode(), headers=[("trace", f"t{i}".encode())])
                for i, e in enumerate([*events, taken])]
        first = tier.process(recs)
        up = [r for r in first.records if r.topic == tier.topics.llm]
        dead = [DeadLetter.model_validate_json(r.value) for r in first.records if r.topic == tier.topics.deadletter]
        # The event that already has the field is dead-lettered before anything is spent on it.
        assert [d.reason for d in dead] == [COLLISION] and dead[0].offset == 3 and len(up) == 3
        second = llm.process([Rec(tier.topics.llm, 0, i, r.key, r.value) for i, r in enumerate(up)])
        out = [r for r in second.records if r.topic == llm.topics.decisions]
        assert sorted(r.key for r in out) == [b"k0", b"k1", b"k2"]
        for r in out:
            i = int(r.key.decode()[1:])
            assert r.headers == [("trace", f"t{i}".encode())]
            back = read_output(r.value, cfg.output)
            assert back.event == events[i]
            assert (back.decision.event_id, back.decision.label, back.decision.tier) == (f"e{i}", "joy", "llm")
    finally:
        tier.health.close()
        llm.health.close()


def test_a_deferral_without_origin_is_written_as_before():
    # A rolling update: the previous release's workers forbid unknown fields in a Deferred.
    d = Deferred(event=Event(id="1", text="t"), first_seen=0.0)
    assert "origin" not in json.loads(d.model_dump_json()) and "origin" not in d.model_dump()
    with_origin = d.model_copy(update={"origin": Origin(key=b"k")})
    assert json.loads(with_origin.model_dump_json())["origin"]["headers"] == []
