"""Attaching to existing topics on a real Tansu broker: kafka.input_topics, input_pattern, decisions_topic."""

from __future__ import annotations

import json
import uuid

import pytest
from kafka import KafkaConsumer
from kafka.errors import KafkaError

from cascade.config import ConfigError, load_config
from cascade.messages import Decision
from workers.check import sample_events
from workers.kafka_io import OutRecord, ensure_topics, make_producer, produce_and_flush
from workers.llm_worker import LLMWorker
from workers.replay_source import events_topic
from workers.tier_worker import TierWorker
from workers.topics import Topics

pytestmark = pytest.mark.integration
LLM = "test-llm"


def config_for(bootstrap: str, **kafka):
    prefix = f"t{uuid.uuid4().hex[:8]}."
    return load_config(None, task={"labels": ["joy", "fear"]}, llm={"name": LLM},
                       kafka={"bootstrap_servers": bootstrap, "topic_prefix": prefix, "partitions": 1, **kafka},
                       state={"backend": "memory"}, server={"metrics_port": 0})


def feed(config, topic: str, ids: list[str]) -> None:
    producer = make_producer(config.kafka)
    try:
        produce_and_flush(producer, [
            OutRecord(topic, i.encode(), json.dumps({"id": i, "text": f"we felt fine {i}", "llm": {LLM: "joy"}}).encode())
            for i in ids])
    finally:
        producer.close()


def decided(config, topic: str) -> set[str]:
    consumer = KafkaConsumer(topic, bootstrap_servers=config.kafka.bootstrap_servers, group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=3000)
    try:
        return {Decision.model_validate_json(r.value).event_id for r in consumer}
    finally:
        consumer.close()


def run_cascade(config, tier_idle_s: float = 4.0) -> None:
    """The first tier (untrained: it defers everything) and the LLM worker, each until idle."""
    tier = TierWorker(config, config.tiers[0].name, metrics_port=0)
    tier.run(max_idle_s=tier_idle_s)
    tier.health.close()
    llm = LLMWorker(config, metrics_port=0)
    llm.run(max_idle_s=4.0)
    llm.health.close()


def test_one_existing_topic_and_a_named_decisions_topic(kafka_bootstrap):
    uid = uuid.uuid4().hex[:8]
    user_topic, decisions = f"user-events-{uid}", f"user-decisions-{uid}"
    ensure_topics(kafka_bootstrap, [user_topic], 1)
    config = config_for(kafka_bootstrap, input_topics=[user_topic], decisions_topic=decisions)
    topics = Topics(config)
    assert topics.inputs_of(config.tiers[0].name) == [user_topic] and user_topic not in topics.all()
    ids = [f"a{i}" for i in range(20)]
    feed(config, user_topic, ids)
    run_cascade(config)
    assert decided(config, decisions) == set(ids)


def test_two_existing_topics(kafka_bootstrap):
    uid = uuid.uuid4().hex[:8]
    first, second = f"user-a-{uid}", f"user-b-{uid}"
    ensure_topics(kafka_bootstrap, [first, second], 1)
    config = config_for(kafka_bootstrap, input_topics=[first, second])
    feed(config, first, [f"a{i}" for i in range(10)])
    feed(config, second, [f"b{i}" for i in range(10)])
    run_cascade(config)
    assert decided(config, Topics(config).decisions) == {f"a{i}" for i in range(10)} | {f"b{i}" for i in range(10)}


def test_pattern_subscription(kafka_bootstrap):
    uid = uuid.uuid4().hex[:8]
    ensure_topics(kafka_bootstrap, [f"pat-{uid}-x", f"pat-{uid}-y"], 1)
    config = config_for(kafka_bootstrap, input_pattern=rf"pat-{uid}-.*")
    feed(config, f"pat-{uid}-x", ["x1", "x2"])
    feed(config, f"pat-{uid}-y", ["y1"])
    # A pattern subscription joins twice (matching topics come from a metadata refresh, then a
    # rejoin), each ~3 s on Tansu: a longer idle window than the named topics need.
    run_cascade(config, tier_idle_s=12.0)
    assert decided(config, Topics(config).decisions) == {"x1", "x2", "y1"}


def test_a_missing_input_topic_is_a_clear_error_and_is_not_created(kafka_bootstrap):
    missing = f"user-missing-{uuid.uuid4().hex[:8]}"
    config = config_for(kafka_bootstrap, input_topics=[missing])
    tier = TierWorker(config, config.tiers[0].name, metrics_port=0)
    try:
        with pytest.raises(KafkaError, match="do not exist"):
            tier.run(max_idle_s=1.0)
    finally:
        tier.health.close()


def test_check_samples_and_replay_read_the_configured_input(kafka_bootstrap):
    """`cascade check` samples the pattern's topics, `cascade replay --topic events` the named input,
    not {prefix}events (which nothing feeds when attached to a user's topics)."""
    uid = uuid.uuid4().hex[:8]
    ensure_topics(kafka_bootstrap, [f"smp-{uid}-x", f"smp-{uid}-y"], 1)
    feed_x, feed_y = ["x1", "x2"], ["y1"]
    by_pattern = config_for(kafka_bootstrap, input_pattern=rf"smp-{uid}-.*")
    feed(by_pattern, f"smp-{uid}-x", feed_x)
    feed(by_pattern, f"smp-{uid}-y", feed_y)
    assert sorted(e.id for e in sample_events(by_pattern, None, 4)) == sorted(feed_x + feed_y)
    with pytest.raises(ConfigError, match="name one topic"):
        events_topic(Topics(by_pattern))
    named = config_for(kafka_bootstrap, input_topics=[f"smp-{uid}-x"])
    assert events_topic(Topics(named)) == f"smp-{uid}-x"
    with pytest.raises(ConfigError, match="name one topic"):
        events_topic(Topics(config_for(kafka_bootstrap, input_topics=[f"smp-{uid}-x", f"smp-{uid}-y"])))
    default = config_for(kafka_bootstrap)
    assert events_topic(Topics(default)) == Topics(default).events
