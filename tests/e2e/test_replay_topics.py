"""`cascade replay` over real Tansu topics and a real Redis: recorded answers recovered from the
decision cache, the demonstrations topic and the events; offset and time ranges; a replay leaves
the live consumer groups and the decisions topic alone; ``--apply`` re-tunes a running tier worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from kafka import KafkaConsumer
from kafka.structs import OffsetAndMetadata

from cascade.config import load_config
from cascade.messages import Decision, Demonstration, LiveParams
from cascade.replay.command import join, replay
from cascade.replay.sweep import parse_sweep
from cascade.state import make_state
from cascade.state.keys import cache_key
from cascade.task import Task
from devtools.services import free_port
from tests.unit.streams import LLM, easy_and_hard
from workers.kafka_io import LagProbe, OutRecord, TopicPartition, ensure_topics, make_producer, produce_and_flush
from workers.replay_source import load_demonstrations, load_topic_range
from workers.topics import Topics

pytestmark = pytest.mark.e2e


def make(kafka_bootstrap: str, redis_url: str, **deferral):
    prefix = f"rp{uuid.uuid4().hex[:8]}."
    config = load_config(None, task={"labels": ["fear", "joy"]}, llm={"name": LLM}, features={"n_features": 2**16},
                         kafka={"bootstrap_servers": kafka_bootstrap, "topic_prefix": prefix, "partitions": 2},
                         redis={"url": redis_url, "key_prefix": prefix}, state={"backend": "redis"},
                         deferral={"warmup": 50, **deferral})
    ensure_topics(kafka_bootstrap, Topics(config).all(), 2)
    return config


def payloads(n: int, seed: int, start: int = 0) -> list[dict]:
    out = []
    for i, (e, _) in enumerate(easy_and_hard(n, seed)):
        out.append({"id": f"e{start + i}", "text": e.text, "llm": e.payload["llm"]})
    return out


def produce(config, topic: str, items: list[tuple[str, bytes]]) -> None:
    producer = make_producer(config.kafka)
    try:
        produce_and_flush(producer, [OutRecord(topic, k.encode(), v) for k, v in items])
    finally:
        producer.close()


def produce_events(config, rows: list[dict]) -> None:
    produce(config, Topics(config).events, [(r["id"], json.dumps(r).encode()) for r in rows])


def read_topic(config, topic: str, want: int, timeout_s: float = 60.0) -> list[bytes]:
    consumer = KafkaConsumer(topic, bootstrap_servers=config.kafka.bootstrap_servers, group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    out: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < want and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=300).values():
                out.extend(r.value for r in recs)
    finally:
        consumer.close()
    return out


def snapshot(config, groups: list[str]) -> tuple[dict, dict]:
    """Committed offsets of the groups and end offsets of every topic of the deployment."""
    topics = Topics(config)
    with LagProbe(config.kafka.bootstrap_servers) as probe:
        committed = {g: probe.committed(g) for g in groups}
        ends = probe.end_offsets(probe.partitions(topics.all()))
    return committed, ends


def write_config(config, tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def cli(config_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CASCADE_CONFIG": str(config_path)}
    return subprocess.run([sys.executable, "-m", "workers.cli", "replay", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_replay_of_a_topic_recovers_the_recorded_answers(kafka_bootstrap, redis_url):
    config = make(kafka_bootstrap, redis_url)
    topics = Topics(config)
    rows = payloads(400, seed=21)
    task = Task(config.task)
    flip = {"joy": "fear", "fear": "joy"}
    expected: dict[str, str] = {}
    # e0-e49: in the decision cache (an answer different from the one the event carries: the cache wins)
    with make_state(config) as state:
        decisions = []
        for r in rows[:50]:
            answer = flip[r["llm"][LLM]]
            expected[r["id"]] = answer
            decisions.append((cache_key(task.name, task.labels, r["text"]),
                              Decision(event_id=r["id"], label=answer, tier="llm", confidence=1.0, reason="llm")))
        assert state.put_decisions(decisions) == 50
    # e50-e149: only on the demonstrations topic (the events carry no answer)
    demos = []
    for r in rows[50:150]:
        expected[r["id"]] = r["llm"][LLM]
        demos.append((r["id"], Demonstration(event_id=r["id"], text=r["text"], llm=LLM,
                                             llm_label=r.pop("llm")[LLM]).model_dump_json().encode()))
    demos.append(("e0", Demonstration(event_id="e0", text="x", llm=LLM, llm_label="joy").model_dump_json().encode()))
    demos.append(("e150", Demonstration(event_id="e150", text="x", llm="other-llm", llm_label="joy")
                  .model_dump_json().encode()))  # another LLM's answer does not count
    produce(config, topics.demonstrations, demos)
    # e150-e159: no answer anywhere; the rest: carried by the event
    for r in rows[150:160]:
        r.pop("llm")
    for r in rows[160:]:
        expected[r["id"]] = r["llm"][LLM]
    produce_events(config, rows[:200])
    time.sleep(1.2)  # a second wave, for a time range
    middle = datetime.now(UTC).isoformat()
    time.sleep(0.1)
    produce_events(config, rows[200:])

    loaded = load_topic_range(config, topics.events, None, None, "label", progress=False)
    assert len(loaded.rows) == 400
    demos = lambda ids: load_demonstrations(config, ids, LLM, progress=False)  # noqa: E731
    joined = join(config, loaded, live_sources=True, demonstrations=demos)
    assert joined.answers == expected
    assert sorted(joined.missing) == sorted(f"e{i}" for i in range(150, 160))
    assert dict(joined.sources) == {"cache": 50, "demonstrations": 100, "field": 240}

    report = replay(config, loaded, parse_sweep(["mu=0.02:1:log5"], ["logistic"]), plot=None, progress=False,
                    demonstrations=demos)
    assert report.missing_llm_answers == 10 and report.events_replayed == 390
    assert report.quality_metric == "agreement_with_llm"  # no gold labels on the topic
    assert report.events_per_hour is not None and report.rate_from == "timestamps"
    fractions = [p.llm_call_fraction for p in report.points]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] > fractions[-1]

    # Warm start: every setting starts from the registry's current snapshots.
    from cascade.routing.cascade import Cascade

    warm = Cascade(config)
    with make_state(config) as state:
        state.publish("tier:logistic", 7, warm.stages[0].tier.snapshot())
        state.publish("policy:logistic", 7, warm.stages[0].policy.snapshot())
    warm_report = replay(config, loaded, parse_sweep(["mu=0.3"], ["logistic"]), plot=None, progress=False,
                         warm_start=True)
    assert warm_report.warm_start == {"tier:logistic": 7, "policy:logistic": 7}

    # Ranges: a time from the middle selects the second wave; offsets per partition.
    second = load_topic_range(config, topics.events, middle, None, "label", progress=False)
    assert {r.event.id for r in second.rows} == {r["id"] for r in rows[200:]}
    first = load_topic_range(config, topics.events, None, middle, "label", progress=False)
    assert {r.event.id for r in first.rows} == {r["id"] for r in rows[:200]}
    window = load_topic_range(config, topics.events, "10", "30", "label", progress=False)
    assert len(window.rows) == 40 and all(v == [10, 30] for v in window.ranges.values())
    tail = load_topic_range(config, topics.events, "-5", None, "label", progress=False)
    assert len(tail.rows) == 10


def test_replay_neither_writes_decisions_nor_moves_live_offsets(kafka_bootstrap, redis_url, tmp_path):
    config = make(kafka_bootstrap, redis_url)
    topics = Topics(config)
    rows = payloads(300, seed=22)
    produce_events(config, rows)
    produce(config, topics.decisions, [(r["id"], Decision(event_id=r["id"], label="joy", tier="llm", confidence=1.0,
                                                           reason="llm").model_dump_json().encode()) for r in rows[:40]])
    # A live group has consumed part of the events topic and committed.
    group = topics.group("tier-logistic")
    live = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    try:
        live.commit({TopicPartition(topics.events, p): OffsetAndMetadata(7 + p, "", -1) for p in (0, 1)})
    finally:
        live.close()
    before = snapshot(config, [group, topics.group("llm")])
    assert before[0][group] == {TopicPartition(topics.events, 0): 7, TopicPartition(topics.events, 1): 8}
    for topic in ("events", "decisions"):
        proc = cli(write_config(config, tmp_path), "--topic", topic, "--sweep", "mu=0.1,0.5", "--no-plot", "--json",
                   "--quiet", "--processes", "1")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["events_replayed"] == (300 if topic == "events" else 40)
    after = snapshot(config, [group, topics.group("llm")])
    assert after == before  # committed offsets and every topic's end offset (decisions included) unchanged


def test_apply_retunes_a_running_tier_worker(kafka_bootstrap, redis_url, tmp_path):
    # An untrained tier, no warm-up, no exploration: at mu=0 it defers everything, at mu=5 it answers everything.
    config = make(kafka_bootstrap, redis_url, warmup=0, mu=0.0, exploration_max=0.0, exploration_min=0.0)
    topics = Topics(config)
    config_path = write_config(config, tmp_path)
    log = (tmp_path / "worker.log").open("ab")
    worker = subprocess.Popen([sys.executable, "-m", "workers.cli", "worker", "--tier", "logistic", "--metrics-port",
                               str(free_port())], stdout=log, stderr=log,
                              env={**os.environ, "CASCADE_CONFIG": str(config_path)})
    try:
        wave1 = payloads(60, seed=23)
        produce_events(config, wave1)
        deferred = read_topic(config, topics.llm, 60)
        assert len(deferred) == 60  # all passed up to the LLM
        group = topics.group("tier-logistic")
        deadline = time.monotonic() + 30
        while True:  # until the worker has committed the batches it deferred
            before = snapshot(config, [group])
            if sum(before[0][group].values()) == 60 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert sum(before[0][group].values()) == 60

        proc = cli(config_path, "--topic", "events", "--sweep", "mu=0,5", "--target", "max_llm_fraction=0.5",
                   "--apply", "--json", "--quiet", "--plot", str(tmp_path / "replay.png"))
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert [p["llm_call_fraction"] for p in report["points"]] == [1.0, 0.0]
        assert report["recommendation"]["label"] == "mu=5"
        assert report["applied"]["mu"] == 5.0 and report["applied"]["exploration_scale"] == 1.0
        assert (tmp_path / "replay.png").stat().st_size > 0
        assert snapshot(config, [group]) == before  # the replay moved no offsets and wrote no decisions
        with make_state(config) as state:
            live = state.get_live_params()
        assert isinstance(live, LiveParams) and live.mu == 5.0

        worker_log = tmp_path / "worker.log"
        deadline = time.monotonic() + 15
        while "live_params_applied" not in worker_log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)  # the worker polls the live parameters every second
        wave2 = payloads(60, seed=24, start=1000)
        produce_events(config, wave2)
        decisions = [Decision.model_validate_json(v) for v in read_topic(config, topics.decisions, 60)]
        assert {d.event_id for d in decisions} == {r["id"] for r in wave2}
        assert {(d.tier, d.reason) for d in decisions} == {("logistic", "tier")}
        assert len(read_topic(config, topics.llm, 61, timeout_s=2.0)) == 60  # nothing more deferred
    finally:
        worker.terminate()
        worker.wait(30)
    assert "live_params_applied" in (tmp_path / "worker.log").read_text()
