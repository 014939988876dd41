"""Reading recorded ranges of topics for ``cascade replay`` — strictly as an observer.

A replay reads with ``group_id=None``, ``assign`` and ``seek``: it joins no consumer group, so it
commits no offsets and cannot disturb the live groups' positions, and it owns no producer, so it
cannot write to the decisions topic (or any topic).

Bounds (``--from``/``--to``) are per partition, ``from`` inclusive and ``to`` exclusive:

* an integer is an offset applied to every partition (a negative one counts back from the end),
* anything else is an ISO-8601 time (naive means UTC), resolved per partition with
  ``offsets_for_times`` to the first record at or after it.

The end of a partition is its high watermark from a Fetch response (``LagProbe``): Tansu's
ListOffsets(LATEST) under-reports it. Tansu also answers ``offsets_for_times`` for a time after
the last record with offset 0 and timestamp -1 instead of no offset; that is read as "the end".
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from kafka import KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from pydantic import ValidationError

from cascade.config import CascadeConfig, ConfigError
from cascade.evaluation.progress import Progress
from cascade.messages import Demonstration
from cascade.replay.command import Loaded
from cascade.replay.join import RecordedEvent
from cascade.security import kafka_client_kwargs
from cascade.task import InvalidEvent, Task
from workers.kafka_io import LagProbe, TopicPartition, _forbid_topic_auto_creation
from workers.output import read_output
from workers.topics import Topics

Bound = int | datetime | None


def parse_bound(text: str | None) -> Bound:
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"expected an offset (integer) or an ISO-8601 time, got {text!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


@dataclass
class Range:
    start: dict[TopicPartition, int]
    end: dict[TopicPartition, int]  # exclusive

    @property
    def total(self) -> int:
        return sum(max(0, self.end[tp] - self.start[tp]) for tp in self.start)

    def describe(self) -> dict[str, list[int]]:
        return {f"{tp.topic}:{tp.partition}": [self.start[tp], self.end[tp]] for tp in sorted(self.start)}


class TopicReader:
    """A group-less reader of exact offset ranges."""

    def __init__(self, config: CascadeConfig, timeout_s: float = 30.0) -> None:
        self.config = config
        self.timeout_s = timeout_s
        ms = int(timeout_s * 1000)
        self.consumer = KafkaConsumer(
            **kafka_client_kwargs(config.kafka),
            client_id="cascade-replay",
            group_id=None,  # no group: nothing to commit, no live group touched
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
            max_partition_fetch_bytes=max(1_048_576, 2 * config.kafka.max_event_bytes),
            bootstrap_timeout_ms=ms,
            request_timeout_ms=ms,
            allow_auto_create_topics=False,
        )
        _forbid_topic_auto_creation(getattr(self.consumer, "_cluster", None))
        self.probe = LagProbe(config.kafka, timeout_s=timeout_s, client_id="cascade-replay-probe")

    def close(self) -> None:
        self.consumer.close()
        self.probe.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exists(self, topic: str) -> bool:
        try:
            self.probe.partitions([topic])
            return True
        except KafkaError:
            return False

    def resolve(self, topic: str, frm: Bound = None, to: Bound = None) -> Range:
        parts = self.probe.partitions([topic])
        begins = self.consumer.beginning_offsets(parts, timeout_ms=int(self.timeout_s * 1000))
        ends = self.probe.end_offsets(parts)

        def at(bound: Bound, default: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
            if bound is None:
                return dict(default)
            if isinstance(bound, int):
                return {tp: (ends[tp] + bound if bound < 0 else bound) for tp in parts}
            ms = int(bound.timestamp() * 1000)
            found = self.consumer.offsets_for_times({tp: ms for tp in parts}, timeout_ms=int(self.timeout_s * 1000))
            out = {}
            for tp in parts:
                hit = found.get(tp)
                out[tp] = ends[tp] if hit is None or hit.timestamp is None or hit.timestamp < 0 else hit.offset
            return out

        start = at(frm, begins)
        end = at(to, ends)
        start = {tp: min(max(start[tp], begins[tp]), ends[tp]) for tp in parts}
        end = {tp: min(max(end[tp], start[tp]), ends[tp]) for tp in parts}
        return Range(start, end)

    def read(self, rng: Range, on_record: Callable[[ConsumerRecord], None], progress: Progress | None = None) -> int:
        """Every record of the range, partition by partition interleaved as fetched; returns the count."""
        todo = [tp for tp in rng.start if rng.end[tp] > rng.start[tp]]
        c = self.consumer
        c.unsubscribe()
        if not todo:
            return 0
        c.assign(todo)
        for tp in todo:
            c.seek(tp, rng.start[tp])
        left = set(todo)
        n = 0
        last = time.monotonic()
        while left:
            batches = c.poll(timeout_ms=500, max_records=5000)
            for tp, records in batches.items():
                if tp not in left:
                    continue
                for rec in records:
                    if rec.offset >= rng.end[tp]:
                        break
                    on_record(rec)
                    n += 1
                if c.position(tp) >= rng.end[tp] or (records and records[-1].offset >= rng.end[tp] - 1):
                    left.discard(tp)
                    c.pause(tp)
            if batches:
                last = time.monotonic()
                if progress is not None:
                    progress.update(min(n, progress.total - 1) if left else progress.total)
            elif time.monotonic() - last > self.timeout_s:
                raise KafkaError(f"replay read stalled: no records for {self.timeout_s}s, partitions left {sorted(left)}")
        c.unsubscribe()
        return n


@dataclass
class TopicLoad:
    rows: list[RecordedEvent]
    range: Range
    topic: str
    kind: str  # "events" or "decisions"
    invalid: Counter[str] = field(default_factory=Counter)
    llm_decisions: dict[str, str | None] = field(default_factory=dict)  # from a decisions range
    seconds: float = 0.0


def _order(items: Iterable[tuple[tuple[int, int, int], RecordedEvent]]) -> list[RecordedEvent]:
    """Replay order: record timestamp, then partition and offset."""
    return [r for _, r in sorted(items, key=lambda kv: kv[0])]


def _gold(payload: dict, gold_field: str | None, labels: Sequence[str]) -> str | None:
    if not gold_field:
        return None
    g = payload.get(gold_field)
    return g if isinstance(g, str) and g in labels else None


def load_topic(
    config: CascadeConfig, topic: str, frm: Bound = None, to: Bound = None, *, kind: str | None = None,
    gold_field: str | None = "label", progress: bool = True,
) -> TopicLoad:
    """The recorded events of a range of the input topic, or of the events a decisions range answered."""
    started = time.perf_counter()
    topics = Topics(config)
    kind = kind or ("decisions" if topic == topics.decisions else "events")
    task = Task(config.task)
    with TopicReader(config) as reader:
        rng = reader.resolve(topic, frm, to)
        invalid: Counter[str] = Counter()
        if kind == "events":
            items: list[tuple[tuple[int, int, int], RecordedEvent]] = []

            def on_event(rec: ConsumerRecord) -> None:
                try:
                    ev = task.parse_event(rec.value, config.kafka.max_event_bytes)
                except InvalidEvent as e:
                    invalid[e.reason] += 1
                    return
                items.append(((rec.timestamp, rec.partition, rec.offset),
                              RecordedEvent(ev, _gold(ev.payload, gold_field, task.labels), rec.timestamp)))

            reader.read(rng, on_event, Progress(rng.total, f"replay: reading {topic}", enabled=progress))
            return TopicLoad(_order(items), rng, topic, kind, invalid, seconds=time.perf_counter() - started)
        # A decisions range: which events it answered, and what the LLM said for them. Enriched
        # decisions carry their event; the others' events are read from the input topics.
        wanted: set[str] = set()
        llm: dict[str, str | None] = {}
        carried: dict[str, tuple[tuple[int, int, int], RecordedEvent]] = {}

        def on_decision(rec: ConsumerRecord) -> None:
            try:
                back = read_output(rec.value, config.output)
            except ValueError:  # pydantic's ValidationError included
                invalid["invalid_decision"] += 1
                return
            d = back.decision
            wanted.add(d.event_id)
            if d.reason == "llm" and d.tier == "llm" and d.label is not None:
                llm[d.event_id] = d.label
            elif d.reason == "llm_unusable":
                llm[d.event_id] = None  # the LLM was asked and named no label
            if back.event is not None:
                try:
                    ev = task.parse_event(back.event)
                except InvalidEvent:
                    return
                # Ordered by when it was decided: the event's own record is not read.
                carried.setdefault(ev.id, ((rec.timestamp, rec.partition, rec.offset),
                                           RecordedEvent(ev, _gold(ev.payload, gold_field, task.labels), rec.timestamp)))
        reader.read(rng, on_decision, Progress(rng.total, f"replay: reading {topic}", enabled=progress))
        items = list(carried.values())

        def on_source(rec: ConsumerRecord) -> None:
            try:
                ev = task.parse_event(rec.value, config.kafka.max_event_bytes)
            except InvalidEvent:
                return
            if ev.id in wanted and ev.id not in carried:
                items.append(((rec.timestamp, rec.partition, rec.offset),
                              RecordedEvent(ev, _gold(ev.payload, gold_field, task.labels), rec.timestamp)))

        if not wanted.issubset(carried):
            for source in source_topics(reader, topics):
                whole = reader.resolve(source)
                reader.read(whole, on_source, Progress(whole.total, f"replay: events of {topic} in {source}", enabled=progress))
        found = {r.event.id for _, r in items}
        invalid["event_not_found"] += len(wanted - found)
        return TopicLoad(_order(items), rng, topic, kind, invalid, llm, seconds=time.perf_counter() - started)


def events_topic(topics: Topics) -> str:
    """What ``--topic events`` names: the first tier's one input topic (``{prefix}events`` unless
    ``kafka.input_topics`` names another); several input topics or a pattern must be named."""
    if len(topics.inputs) == 1:
        return topics.inputs[0]
    given = topics.inputs or [f"pattern {topics.input_pattern!r}"]
    raise ConfigError(f"replay: the first tier reads {', '.join(given)}; name one topic with --topic")


def source_topics(reader: TopicReader, topics: Topics) -> list[str]:
    """The topics the first tier reads: the configured input topics, or those its pattern matches now."""
    if topics.input_pattern is None:
        return list(topics.inputs)
    pattern = re.compile(topics.input_pattern)
    return sorted(t for t in reader.consumer.topics() if pattern.match(t))  # matched as kafka-python subscribes


def load_demonstrations(config: CascadeConfig, ids: set[str], llm_name: str, progress: bool = True) -> dict[str, str]:
    """LLM labels by event id from the whole demonstrations topic (only ``ids``, only ``llm_name``)."""
    topic = Topics(config).demonstrations
    out: dict[str, str] = {}
    with TopicReader(config) as reader:
        if not reader.exists(topic):
            return out
        rng = reader.resolve(topic)

        def on_demo(rec: ConsumerRecord) -> None:
            try:
                d = Demonstration.model_validate_json(rec.value)
            except ValidationError:
                return
            if d.event_id in ids and d.llm == llm_name:
                out.setdefault(d.event_id, d.llm_label)

        reader.read(rng, on_demo, Progress(rng.total, f"replay: reading {topic}", enabled=progress))
    return out


def load_topic_range(config: CascadeConfig, topic: str, frm: str | None, to: str | None, gold_field: str | None,
                     progress: bool) -> Loaded:
    try:
        lo, hi = parse_bound(frm), parse_bound(to)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        got = load_topic(config, topic, lo, hi, gold_field=gold_field, progress=progress)
    except KafkaError as e:
        raise ConfigError(f"replay: cannot read topic {topic!r} at {config.kafka.bootstrap_servers}: {e}") from None
    return Loaded(got.rows, topic, got.kind, got.range.describe(), dict(got.invalid), got.llm_decisions, got.seconds)
