"""output.mode: enriched on a real Tansu broker: a warm first tier and the LLM worker, in-process,
each emit the original event (key, headers, fields) with its decision under the field."""

from __future__ import annotations

import json
import uuid

import pytest
from kafka import KafkaConsumer

from cascade.config import KafkaConfig, OutputConfig
from cascade.learning.registry import model_names
from cascade.messages import DeadLetter, Decision, Deferred, LiveParams
from cascade.routing.cascade import Cascade
from tests.unit.streams import easy_and_hard
from tests.unit.test_engine import make_config
from workers.kafka_io import OutRecord, ensure_topics, make_producer, produce_and_flush
from workers.llm_worker import LLMWorker
from workers.output import COLLISION, output_record, read_output
from workers.replay_source import load_topic
from workers.tier_worker import TierWorker
from workers.topics import Topics

pytestmark = pytest.mark.integration


def read(bootstrap: str, topic: str) -> list:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=3000)
    try:
        return list(consumer)
    finally:
        consumer.close()


def test_enriched_records_from_the_first_tier_and_from_the_llm(kafka_bootstrap):
    warm = Cascade(make_config(mu=0.1))
    for e, _ in easy_and_hard(2000, seed=31):
        warm.process([e])
    warm.set_params(LiveParams(mu=0.1, exploration_scale=0.0))  # deterministic: no exploration

    uid = uuid.uuid4().hex[:8]
    user_topic = f"shop-reviews-{uid}"
    ensure_topics(kafka_bootstrap, [user_topic], 1)
    config = make_config(mu=0.1).model_copy(update={
        "kafka": KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=f"t{uid}.", partitions=1, input_topics=[user_topic]),
        "output": OutputConfig(mode="enriched", field="cascade"),
    })
    config.server.metrics_port = 0
    topics = Topics(config)

    # The user's events: the id is a number inside the JSON, the key is something else, headers ride along.
    stream = easy_and_hard(200, seed=32)
    sent: dict[bytes, tuple[dict, list[tuple[str, bytes]]]] = {}
    for e, _ in stream:
        payload = {**e.payload, "shop": {"region": "eu", "stars": 4}, "note": "tr\u00e8s bien \U0001f600"}
        sent[f"order-{e.id}".encode()] = (payload, [("trace-id", f"tr-{e.id}".encode()), ("source", b"\x00web")])
    taken = {"id": 9999, "text": "we were happy", "cascade": {"theirs": True}, "llm": {"test-llm": "joy"}}
    producer = make_producer(config.kafka)
    try:
        produce_and_flush(producer, [OutRecord(user_topic, k, json.dumps(p).encode(), h) for k, (p, h) in sent.items()]
                          + [OutRecord(user_topic, b"order-9999", json.dumps(taken).encode())])
    finally:
        producer.close()

    tier = TierWorker(config, config.tiers[0].name, metrics_port=0)
    try:
        stage = warm.stages[0]
        for name, model in zip(model_names(stage.tier.name), (stage.tier, stage.policy)):
            tier.state.publish(name, model.version, model.snapshot())
        tier.state.set_live_params(stage.params)
        tier.follower.every_s = 0.0
        tier.follower.poll()
        assert tier.stage.tier.version == stage.tier.version
        tier.run(max_idle_s=4.0)
    finally:
        tier.health.close()
    llm = LLMWorker(config, metrics_port=0)
    try:
        llm.run(max_idle_s=4.0)
    finally:
        llm.health.close()

    records = read(kafka_bootstrap, topics.decisions)
    assert sorted(r.key for r in records) == sorted(sent)  # one record per event, under the original key
    by_tier = {"logistic": 0, "llm": 0}
    for r in records:
        payload, headers = sent[r.key]
        assert list(r.headers) == headers
        back = read_output(r.value, config.output)
        assert back.event == payload  # every original field intact
        d = back.decision
        assert d.event_id == str(payload["id"]) and d.label in ("fear", "joy") and d.model_versions
        by_tier[d.tier] += 1
        assert d.reason == ("tier" if d.tier == "logistic" else "llm")
    assert by_tier["logistic"] > 20 and by_tier["llm"] > 20  # both produce sites emitted enriched records
    dead = [DeadLetter.model_validate_json(r.value) for r in read(kafka_bootstrap, topics.deadletter)]
    assert [(d.reason, d.key, d.source_topic) for d in dead] == [(COLLISION, "order-9999", user_topic)]


@pytest.mark.parametrize("mode", ["decision", "enriched"])
def test_replay_finds_the_events_of_a_decisions_range(kafka_bootstrap, mode):
    """A decisions range replays the events it answered: enriched decisions carry them; decision
    records are joined with the configured input topic (not {prefix}events, which is not read)."""
    uid = uuid.uuid4().hex[:8]
    user_topic = f"user-events-{uid}"
    ensure_topics(kafka_bootstrap, [user_topic], 1)
    config = make_config(mu=0.1).model_copy(update={
        "kafka": KafkaConfig(bootstrap_servers=kafka_bootstrap, topic_prefix=f"t{uid}.", partitions=1, input_topics=[user_topic]),
        "output": OutputConfig(mode=mode),
    })
    topics = Topics(config)
    ensure_topics(kafka_bootstrap, topics.all(), 1)
    stream = easy_and_hard(10, seed=33)
    decided = [Decision(event_id=e.id, label="joy", tier="llm", confidence=1.0, reason="llm") for e, _ in stream[:6]]
    producer = make_producer(config.kafka)
    try:
        # Enriched: the user's topic holds none of the events; the decisions alone must do.
        produce_and_flush(producer, [OutRecord(user_topic, e.id.encode(), json.dumps(e.payload).encode())
                                     for e, _ in stream if mode == "decision"]
                          + [output_record(config.output, topics.decisions, d, Deferred(event=e))
                             for d, (e, _) in zip(decided, stream)])
    finally:
        producer.close()
    got = load_topic(config, topics.decisions, kind="decisions", gold_field=None, progress=False)
    assert sorted(r.event.id for r in got.rows) == sorted(d.event_id for d in decided)
    assert {r.event.id: r.event.text for r in got.rows} == {e.id: e.text for e, _ in stream[:6]}
    assert got.llm_decisions == {d.event_id: "joy" for d in decided} and not got.invalid.get("event_not_found")
