"""Broker and Redis faults injected into the whole pipeline, run as processes on a Tansu and a Redis
of its own; shared by tests/e2e/test_faults.py and bench/faults.py.

A scenario feeds the events (paced, so the stream spans the fault), waits until a quarter are
decided, injects its fault, waits until every event is decided, and counts from the topics:
events, decided (distinct ids with a decision), duplicates (decision records beyond one per
event), lost (neither decided nor dead-lettered), dead-lettered, and the workers that exited.

Scenarios:
- ``tansu-freeze``: the broker SIGSTOPped for ``freeze_s`` (15 s), then SIGCONT.
- ``tansu-restart``: the broker killed (SIGKILL) and started again on its port 4 s later. Its
  storage is memory: topics, records and group offsets are gone. The workers are paused
  (SIGSTOP) for the moment the decisions made so far are read, then resumed before the kill,
  so they live through the outage; afterwards the topics are created again and every event is
  produced again. What this proves: no worker exits, every event is decided, and none twice
  across the restart (the idempotency records in Redis turn the re-produced events that were
  decided before into duplicates that are not decided again).
- ``redis-freeze``: Redis SIGSTOPped for ``redis_freeze_s`` (10 s), then SIGCONT.
- ``redis-restart``: Redis restarted empty (no persistence): the loss is detected.
- ``redis-restart-fail-closed``: the same with ``state.on_redis_loss: fail_closed``: the LLM worker
  holds its calls until ``cascade state confirm-loss``, which the scenario runs after checking
  that no LLM call was made for ``hold_check_s``.
- ``redis-freeze-restart``: Redis frozen 10 s, then restarted empty.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kafka import KafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from cascade.config import CascadeConfig, load_config
from cascade.logging import get_logger
from cascade.messages import Decision
from devtools.services import free_port, start_redis, start_tansu
from workers.kafka_io import OutRecord, ensure_topics, make_producer, produce_and_flush
from workers.run import start_workers, stop_workers, worker_commands, write_worker_config
from workers.topics import Topics

log = get_logger("devtools.faults")

SCENARIOS = ("none", "tansu-freeze", "tansu-restart", "redis-freeze", "redis-restart", "redis-restart-fail-closed",
             "redis-freeze-restart")

Row = tuple[str, bytes]  # event id, the event's JSON


@dataclass
class FaultResult:
    scenario: str
    events: int
    decided_at_fault: int = 0  # decided when the fault was injected: the rest were decided through it
    decided: int = 0
    duplicates: int = 0
    lost: int = 0
    dead_lettered: int = 0
    worker_exits: dict[str, int] = field(default_factory=dict)  # role -> exit code, of those that exited
    loss_detected: bool | None = None  # the Redis scenarios that empty it: some worker reported it
    llm_held: bool | None = None  # fail_closed: no LLM call while the loss was unconfirmed
    seconds: float = 0.0

    def row(self) -> dict[str, object]:
        out = asdict(self)
        out["worker_exits"] = len(self.worker_exits)
        return out


def read_topic(bootstrap: str, topic: str, idle_s: float = 2.0, max_s: float | None = None) -> list[bytes]:
    """The topic's records from the start, until none came for ``idle_s`` (or ``max_s`` passed:
    a topic still being written never goes idle)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=int(idle_s * 1000))
    deadline = None if max_s is None else time.monotonic() + max_s
    out = []
    try:
        for rec in consumer:
            out.append(rec.value)
            if deadline is not None and time.monotonic() > deadline:
                break
        return out
    finally:
        consumer.close()


class FaultPipeline:
    """Tansu, Redis and the workers, with handles to freeze, kill and restart the first two."""

    def __init__(self, run_dir: Path, labels: list[str], llm: str, *, on_redis_loss: str = "fail_open",
                 task: str = "faults") -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.tansu = start_tansu(None, run_dir=run_dir)
        self.redis = start_redis(run_dir=run_dir)
        prefix = f"f{uuid.uuid4().hex[:8]}."
        self.config: CascadeConfig = load_config(
            None, task={"name": task, "labels": labels}, llm={"name": llm, "backend": "recorded"},
            kafka={"bootstrap_servers": self.tansu.bootstrap_servers, "topic_prefix": prefix, "partitions": 2},
            redis={"url": self.redis.url, "key_prefix": prefix},
            state={"backend": "redis", "on_redis_loss": on_redis_loss}, deferral={"warmup": 100, "mu": 0.3})
        self.topics = Topics(self.config)
        self.create_topics()
        base = free_port()
        roles = [role for role, _ in worker_commands(Path("-"), [t.name for t in self.config.tiers], base)]
        self.ports = {role: base + i for i, role in enumerate(roles)}
        self.procs = dict(zip(roles, start_workers(self.config, run_dir, base), strict=True))
        # What a broker restart took with it: decisions and dead letters read just before.
        self.decisions_before: list[bytes] = []
        self.letters_before: list[bytes] = []

    def create_topics(self) -> None:
        ensure_topics(self.config.kafka, self.topics.all(), 2)

    def feed(self, rows: list[Row], rate: float | None = None, stop: threading.Event | None = None) -> None:
        """Produce ``rows`` (``rate`` a second), until all are acknowledged or ``stop`` is set."""
        producer = make_producer(self.config.kafka, client_id="faults-feeder")
        step = 100 if rate is None else max(1, int(rate / 10))
        start = time.monotonic()
        try:
            for i in range(0, len(rows), step):
                if stop is not None and stop.is_set():
                    return
                if rate is not None:
                    time.sleep(max(0.0, start + i / rate - time.monotonic()))
                produce_and_flush(producer, [OutRecord(self.topics.events, k.encode(), v) for k, v in rows[i : i + step]])
        finally:
            producer.close()

    def decisions(self, max_s: float | None = None) -> list[Decision]:
        raw = self.decisions_before + read_topic(self.config.kafka.bootstrap_servers, self.topics.decisions, max_s=max_s)
        return [Decision.model_validate_json(v) for v in raw]

    def dead_letters(self) -> int:
        return len(self.letters_before) + len(read_topic(self.config.kafka.bootstrap_servers, self.topics.deadletter))

    def wait_decided(self, ids: set[str], want: int, timeout_s: float) -> int:
        """Until at least ``want`` of ``ids`` are decided (or the timeout); how many are."""
        deadline = time.monotonic() + timeout_s
        while True:
            n = len(ids & {d.event_id for d in self.decisions(max_s=3.0)})
            if n >= want or time.monotonic() > deadline:
                return n
            time.sleep(1.0)

    def metric(self, role: str, name: str) -> float | None:
        """The sum of a worker's samples of ``name``; None when it cannot be reached."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[role]}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until every worker's /readyz answers 200 (joined its group, partitions assigned)."""
        deadline = time.monotonic() + timeout_s
        waiting = set(self.ports)
        while waiting and time.monotonic() < deadline:
            for role in list(waiting):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[role]}/readyz", timeout=2):
                        waiting.discard(role)
                except OSError:
                    pass
            time.sleep(0.5)

    def wait_metric(self, role: str, name: str, value: float, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.metric(role, name) == value:
                return True
            time.sleep(0.5)
        return False

    def signal_workers(self, signum: int) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.kill(p.pid, signum)

    def freeze(self, pid: int | None, seconds: float) -> None:
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)

    def restart_tansu(self, down_s: float = 4.0) -> None:
        """Kill the broker and start it again on its port (empty: memory storage)."""
        self.signal_workers(signal.SIGSTOP)
        try:
            time.sleep(2.0)  # requests already sent are answered before the read
            self.decisions_before = read_topic(self.config.kafka.bootstrap_servers, self.topics.decisions)
            self.letters_before = read_topic(self.config.kafka.bootstrap_servers, self.topics.deadletter)
            assert self.tansu.process is not None
            self.tansu.process.kill()
            self.tansu.process.wait()
        finally:
            self.signal_workers(signal.SIGCONT)
        time.sleep(down_s)
        self.tansu = start_tansu(self.tansu.port, run_dir=self.run_dir)
        self.create_topics()

    def confirm_loss(self) -> None:
        config_path, secrets = write_worker_config(self.config, self.run_dir / "confirm")
        subprocess.run([sys.executable, "-m", "workers.cli", "--config", str(config_path), "state", "confirm-loss"],
                       check=True, env={**os.environ, **secrets}, capture_output=True, timeout=60)

    def exits(self) -> dict[str, int]:
        return {role: code for role, p in self.procs.items() if (code := p.poll()) is not None}

    def close(self) -> None:
        stop_workers(list(self.procs.values()))
        self.redis.stop()
        self.tansu.stop()


def run_scenario(scenario: str, rows: list[Row], labels: list[str], llm: str, run_dir: Path, *,
                 rate: float = 100.0, freeze_s: float = 15.0, redis_freeze_s: float = 10.0, hold_check_s: float = 5.0,
                 timeout_s: float = 300.0) -> FaultResult:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; known: {SCENARIOS}")
    started = time.monotonic()
    result = FaultResult(scenario, len(rows))
    ids = {i for i, _ in rows}
    pipe = FaultPipeline(run_dir, labels, llm, on_redis_loss="fail_closed" if scenario.endswith("fail-closed") else "fail_open")
    stop_feeding = threading.Event()
    feeder = threading.Thread(target=pipe.feed, args=(rows, rate, stop_feeding), daemon=True)
    try:
        pipe.wait_ready()  # the stream starts once the workers consume: the fault then lands mid-stream
        feeder.start()
        log.info("faults.stream_started", scenario=scenario, events=len(rows), rate=rate)
        result.decided_at_fault = pipe.wait_decided(ids, len(rows) // 4, timeout_s)
        log.info("faults.injecting", scenario=scenario, decided=result.decided_at_fault)
        if scenario == "tansu-freeze":
            pipe.freeze(pipe.tansu.pid, freeze_s)
        elif scenario == "tansu-restart":
            stop_feeding.set()  # the rest is fed after the restart
            feeder.join()
            pipe.restart_tansu()
            result.decided_at_fault = len(ids & {d.event_id for d in pipe.decisions()})
            # Memory storage only: the consumers' positions from before point past the empty,
            # re-created logs. Fed at once, the new records could reach those offsets before a
            # consumer's first fetch is refused as out of range (and reset to the start), and be
            # skipped. A broker that keeps its data has no such gap; here the workers rejoin and
            # fetch first.
            pipe.wait_ready()
            time.sleep(3.0)
            pipe.feed(rows)  # all again: memory storage, the events are gone with the broker
        elif scenario == "redis-freeze":
            pipe.freeze(pipe.redis.pid, redis_freeze_s)
        elif scenario.startswith("redis-"):
            if scenario == "redis-freeze-restart":
                pipe.freeze(pipe.redis.pid, redis_freeze_s)
            pipe.redis.restart()
            result.loss_detected = pipe.wait_metric("llm", "cascade_redis_loss_detected", 1.0, 60.0)
            if scenario.endswith("fail-closed"):
                calls = pipe.metric("llm", "cascade_llm_calls_total")
                time.sleep(hold_check_s)
                undecided = len(rows) - pipe.wait_decided(ids, len(rows), 0)
                result.llm_held = calls == pipe.metric("llm", "cascade_llm_calls_total") and undecided > 0
                pipe.confirm_loss()
                pipe.wait_metric("llm", "cascade_redis_loss_detected", 0.0, 30.0)
        feeder.join()
        pipe.wait_decided(ids, len(rows), timeout_s)
        time.sleep(2.0)  # a decision sent twice would be on the topic by now
        result.worker_exits = pipe.exits()
        decisions = pipe.decisions()
        decided = {d.event_id for d in decisions} & ids
        result.decided = len(decided)
        result.duplicates = len(decisions) - len({d.event_id for d in decisions})
        result.dead_lettered = pipe.dead_letters()
        result.lost = len(rows) - result.decided - result.dead_lettered
    finally:
        pipe.close()
    result.seconds = round(time.monotonic() - started, 1)
    return result


def synthetic_rows(n: int, llm: str, seed: int = 0) -> tuple[list[Row], list[str]]:
    """Events with a recorded LLM answer each, words that give the cheap tiers something to learn."""
    import random

    words = {"joy": ["happy", "glad"], "fear": ["afraid", "scared"], "anger": ["furious", "angry"]}
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(sorted(words))
        text = f"event {i} we felt {rng.choice(words[label])} about it"
        rows.append((f"e{i}", json.dumps({"id": f"e{i}", "text": text, "llm": {llm: label}}).encode()))
    return rows, sorted(words)
