"""workers.kafka_io against a real Tansu broker over TCP."""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest
from kafka.structs import TopicPartition

from cascade.config import KafkaConfig
from workers.kafka_io import (
    LagProbe,
    OutRecord,
    ProduceError,
    commit_batch,
    consumer_lag,
    ensure_topics,
    make_consumer,
    make_producer,
    poll_records,
    produce_and_flush,
    topic_partitions,
)
from workers.observability import LagSampler, WorkerMetrics

pytestmark = pytest.mark.integration


def _name(prefix: str) -> str:
    return f"test.{prefix}.{uuid.uuid4().hex[:8]}"


def _cfg(bootstrap: str) -> KafkaConfig:
    return KafkaConfig(bootstrap_servers=bootstrap, partitions=3)


def test_ensure_topics_creates_requested_partitions(kafka_bootstrap: str) -> None:
    a, b = _name("a"), _name("b")
    ensure_topics(kafka_bootstrap, [a, b], partitions=3, replication_factor=1)
    parts = topic_partitions(kafka_bootstrap, [a, b])
    assert Counter(tp.topic for tp in parts) == {a: 3, b: 3}
    # Idempotent, also when some topics exist and others do not.
    c = _name("c")
    ensure_topics(kafka_bootstrap, [a, c], partitions=3)
    assert len(topic_partitions(kafka_bootstrap, [c])) == 3
    assert len(topic_partitions(kafka_bootstrap, [a])) == 3


def test_produce_consume_commit_resume_and_lag(kafka_bootstrap: str) -> None:
    cfg = _cfg(kafka_bootstrap)
    topic, group = _name("events"), _name("group")
    ensure_topics(kafka_bootstrap, [topic], partitions=3)
    n = 300
    producer = make_producer(cfg)
    try:
        metas = []
        for start in range(0, n, 100):  # several multi-record batches per partition
            metas += produce_and_flush(
                producer, [OutRecord(topic, f"k{i}".encode(), f"v{i}".encode()) for i in range(start, start + 100)]
            )
    finally:
        producer.close()
    assert len(metas) == n
    ends = {TopicPartition(topic, p): 0 for p in range(3)}
    for m in metas:
        tp = TopicPartition(m.topic, m.partition)
        ends[tp] = max(ends[tp], m.offset + 1)
    assert sum(ends.values()) == n

    # Nothing committed yet: lag is everything.
    with LagProbe(kafka_bootstrap) as probe:
        assert probe.end_offsets(list(ends)) == ends  # true ends, despite Tansu's ListOffsets
        assert probe.lag(group, [topic]) == ends

    # First member processes part of the stream, committing after each batch.
    first: list[tuple[int, int, bytes]] = []
    committed: dict[TopicPartition, int] = {}
    consumer = make_consumer(cfg, group, [topic], max_poll_records=40)
    deadline = time.monotonic() + 20
    try:
        while len(first) < 120 and time.monotonic() < deadline:
            batch = poll_records(consumer, timeout_ms=200)
            first += [(r.partition, r.offset, r.value) for r in batch]
            committed.update(commit_batch(consumer, batch))
    finally:
        consumer.close()
    assert 120 <= len(first) < n

    expected_lag = {tp: ends[tp] - committed.get(tp, 0) for tp in ends}
    assert consumer_lag(kafka_bootstrap, group, [topic]) == expected_lag
    assert sum(expected_lag.values()) == n - len(first)

    # A new member of the same group resumes exactly after the committed offsets.
    second: list[tuple[int, int, bytes]] = []
    consumer = make_consumer(cfg, group, [topic])
    deadline = time.monotonic() + 20
    try:
        while len(first) + len(second) < n and time.monotonic() < deadline:
            batch = poll_records(consumer, timeout_ms=200)
            second += [(r.partition, r.offset, r.value) for r in batch]
            commit_batch(consumer, batch)
        # Nothing more arrives (no redelivery of committed records).
        assert poll_records(consumer, timeout_ms=300) == []
    finally:
        consumer.close()

    seen = [(p, o) for p, o, _ in first + second]
    assert len(seen) == len(set(seen)) == n  # no duplicates, none lost
    assert {v for _, _, v in first + second} == {f"v{i}".encode() for i in range(n)}
    assert consumer_lag(kafka_bootstrap, group, [topic]) == {tp: 0 for tp in ends}


def test_lag_of_group_that_never_committed(kafka_bootstrap: str) -> None:
    cfg = _cfg(kafka_bootstrap)
    topic = _name("idle")
    ensure_topics(kafka_bootstrap, [topic], partitions=2)
    producer = make_producer(cfg)
    try:
        produce_and_flush(producer, [(topic, None, b"x")] * 7 + [OutRecord(topic, None, b"y", partition=1)])
    finally:
        producer.close()
    lag = consumer_lag(kafka_bootstrap, _name("nobody"), [topic])
    assert sum(lag.values()) == 8 and lag[TopicPartition(topic, 1)] >= 1

    # A worker's sampler thread exports the same lag as its gauge, and keeps it current.
    metrics = WorkerMetrics("tier-test")
    sampler = LagSampler(metrics, kafka_bootstrap, _name("nobody"), [topic], every_s=0.2)
    deadline = time.monotonic() + 15

    def exported(value: int) -> bool:
        while metrics.registry.get_sample_value("cascade_consumer_lag", {"role": "tier-test"}) != value:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    producer = make_producer(cfg)
    try:
        assert exported(8)
        produce_and_flush(producer, [(topic, None, b"z")] * 3)
        assert exported(11)
    finally:
        sampler.close()
        producer.close()


def test_produce_and_flush_raises_instead_of_losing_records(kafka_bootstrap: str) -> None:
    cfg = _cfg(kafka_bootstrap)
    topic = _name("strict")
    ensure_topics(kafka_bootstrap, [topic], partitions=1)
    producer = make_producer(cfg, delivery_timeout_s=1.5)
    try:
        with pytest.raises(ProduceError):  # larger than max_request_size
            produce_and_flush(producer, [(topic, None, b"ok"), (topic, None, b"x" * 3_000_000)])
        with pytest.raises(ProduceError):  # topic missing and auto-creation is off
            produce_and_flush(producer, [(_name("missing"), None, b"x")], timeout_s=3)
        assert produce_and_flush(producer, []) == []
    finally:
        producer.close()
