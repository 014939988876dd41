"""``cascade check``: a preflight before anything is paid for.

It connects to Kafka (the user's input topics exist, the pipeline's own topics exist or are
created, a probe record goes out and comes back) and to Redis (a probe key is written, read and
deleted); then it asks the LLM about sample events — from a file, or the newest records of the
input topics — and prints what each raw answer mapped to. It fails (exit 1) when any of this
fails, or when more than ``max_unmapped`` of the answers name no label: a label set that does
not match the LLM's answers would otherwise pay for every call and learn nothing.

``cascade run`` and the workers run the connection part (:func:`check_connections`) at start.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import redis
from kafka import KafkaConsumer, TopicPartition
from pydantic import BaseModel

from cascade.config import CascadeConfig
from cascade.evaluation.data import read_stream
from cascade.logging import get_logger
from cascade.messages import Event
from cascade.security import kafka_client_kwargs, redis_client_kwargs
from cascade.task import Task
from cascade.tiers.llm import LLMError, make_backend
from workers.kafka_io import OutRecord, ensure_topics, make_producer, produce_and_flush, require_topics
from workers.topics import Topics

log = get_logger("cascade.check")
PROBE_TIMEOUT_S = 15.0


class Check(BaseModel):
    name: str
    ok: bool
    detail: str


class AnswerRow(BaseModel):
    raw: str | None
    label: str | None
    count: int


class CheckReport(BaseModel):
    checks: list[Check]
    answers: list[AnswerRow] = []
    unmapped_share: float | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def _kafka(config: CascadeConfig) -> list[Check]:
    kcfg = config.kafka
    topics = Topics(config)
    try:
        require_topics(kcfg, topics.external, timeout_s=PROBE_TIMEOUT_S)
        ensure_topics(kcfg, [*topics.all(), topics.prefix + "check"], kcfg.partitions, kcfg.replication_factor,
                      timeout_s=PROBE_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - any failure to reach or prepare the cluster is the finding
        return [Check(name="kafka topics", ok=False, detail=f"{type(e).__name__}: {e}")]
    found = [Check(name="kafka topics", ok=True,
                   detail=f"input {topics.external or topics.input_pattern or topics.events}; own topics present")]
    probe_topic, marker = topics.prefix + "check", uuid.uuid4().hex.encode()
    try:
        producer = make_producer(kcfg, client_id="cascade-check")
        try:
            produce_and_flush(producer, [OutRecord(probe_topic, marker, marker)])
        finally:
            producer.close()
        found.append(Check(name="kafka produce", ok=True, detail=f"probe record on {probe_topic}"))
        if _consumed(config, probe_topic, marker):
            found.append(Check(name="kafka consume", ok=True, detail="probe record read back"))
        else:
            found.append(Check(name="kafka consume", ok=False, detail=f"probe record not read back within {PROBE_TIMEOUT_S:g} s"))
    except Exception as e:  # noqa: BLE001
        found.append(Check(name="kafka produce", ok=False, detail=f"{type(e).__name__}: {e}"))
    return found


def _consumed(config: CascadeConfig, topic: str, marker: bytes) -> bool:
    """Read the probe back as an observer (no group, no commit)."""
    consumer = KafkaConsumer(**kafka_client_kwargs(config.kafka), group_id=None, enable_auto_commit=False,
                             consumer_timeout_ms=1000)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + PROBE_TIMEOUT_S
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                if any(r.key == marker for r in records):
                    return True
        return False
    finally:
        consumer.close()


def _redis(config: CascadeConfig) -> list[Check]:
    key = f"{config.redis.key_prefix}{config.pipeline}:check:{uuid.uuid4().hex}"
    try:
        client = redis.Redis.from_url(config.redis.url, socket_timeout=config.redis.socket_timeout_s,
                                      socket_connect_timeout=config.redis.socket_timeout_s,
                                      **redis_client_kwargs(config.redis))
        try:
            client.set(key, b"probe", ex=60)
            read = client.get(key)
            client.delete(key)
        finally:
            client.close()
    except Exception as e:  # noqa: BLE001 - any failure to reach or write Redis is the finding
        return [Check(name="redis", ok=False, detail=f"{type(e).__name__}: {e}")]
    if read != b"probe":
        return [Check(name="redis", ok=False, detail=f"wrote a probe key, read back {read!r}")]
    return [Check(name="redis", ok=True, detail="probe key written, read and deleted")]


def check_connections(config: CascadeConfig) -> list[Check]:
    """Kafka, and Redis where the state lives there."""
    found = _kafka(config)
    if config.state.backend == "redis":
        found += _redis(config)
    return found


def sample_events(config: CascadeConfig, data: Path | None, n: int) -> list[Event]:
    """``n`` sample events: the first of a file, else the newest of the input topics."""
    if data is not None:
        return [r.event for r in read_stream(data, limit=n)]
    from workers.replay_source import TopicReader, load_topic, source_topics  # reads as an observer

    topics = Topics(config)
    with TopicReader(config) as reader:
        names = source_topics(reader, topics)  # a pattern's matches too
    rows = []
    for topic in names:
        per_partition = max(1, n // max(config.kafka.partitions, 1))
        rows += load_topic(config, topic, -per_partition, None, gold_field=None, progress=False).rows
    return [r.event for r in rows[:n]]


def check_llm(config: CascadeConfig, events: Sequence[Event], max_unmapped: float) -> tuple[list[Check], list[AnswerRow], float | None]:
    """Ask the LLM about each sample; the table of raw answers and what they mapped to."""
    if not events:
        return [Check(name="llm", ok=False, detail="no sample events (give --data FILE or feed the input topic)")], [], None
    task = Task(config.task)
    backend = make_backend(task, config.llm)
    rows: Counter[tuple[str | None, str | None]] = Counter()
    failures: Counter[str] = Counter()
    for event in events:
        try:
            [answer] = backend.answer([event])
        except LLMError as e:
            failures[e.reason] += 1
            continue
        rows[answer.raw, answer.label] += 1
    answered = sum(rows.values())
    found = []
    if failures:
        found.append(Check(name="llm calls", ok=False, detail=f"{sum(failures.values())} of {len(events)} failed: {dict(failures)}"))
    else:
        found.append(Check(name="llm calls", ok=True, detail=f"{answered} answers from {config.llm.name}"))
    table = [AnswerRow(raw=raw, label=label, count=c) for (raw, label), c in rows.most_common()]
    share = None
    if answered:
        share = sum(c for (_, label), c in rows.items() if label is None) / answered
        ok = share <= max_unmapped
        found.append(Check(
            name="llm answers map to labels", ok=ok,
            detail=f"{share:.0%} map to no label (at most {max_unmapped:.0%}); labels {task.labels}"
            + ("" if ok else "; fix task.labels or task.label_aliases"),
        ))
    return found, table, share


def run_check(config: CascadeConfig, *, data: Path | None, samples: int, max_unmapped: float, llm: bool = True) -> CheckReport:
    checks = check_connections(config)
    report = CheckReport(checks=checks)
    if llm:
        try:
            events = sample_events(config, data, samples)
        except Exception as e:  # noqa: BLE001 - unreadable samples are a finding, not a crash
            report.checks.append(Check(name="samples", ok=False, detail=f"{type(e).__name__}: {e}"))
            return report
        found, report.answers, report.unmapped_share = check_llm(config, events, max_unmapped)
        report.checks += found
    return report


def print_report(report: CheckReport) -> None:
    for c in report.checks:
        print(f"{'ok  ' if c.ok else 'FAIL'}  {c.name:<28} {c.detail}")
    if report.answers:
        print("\nraw answer → label")
        for row in report.answers:
            raw = "(none)" if row.raw is None else repr(row.raw[:60])
            print(f"  {row.count:>4} × {raw:<62} → {row.label if row.label is not None else 'NO LABEL'}")
    print("\n" + ("all checks passed" if report.ok else "check FAILED"))
