"""The distributed pipeline as processes, on a real Tansu broker and a real Redis."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import time
import urllib.request
import uuid

import pytest
from kafka import KafkaConsumer

from cascade.config import load_config
from cascade.messages import DeadLetter, Decision
from cascade.state import make_state
from devtools.services import free_port
from workers.kafka_io import OutRecord, ensure_topics, make_producer, produce_and_flush
from workers.run import collect_decisions, start_workers, stop_workers
from workers.topics import Topics

pytestmark = pytest.mark.e2e
LLM = "test-llm"
WORDS = {"joy": ["happy", "glad"], "fear": ["afraid", "scared"], "anger": ["furious", "angry"]}


@pytest.fixture
def pipeline_config(kafka_bootstrap, redis_url, tmp_path):
    prefix = f"t{uuid.uuid4().hex[:8]}."
    db_url = redis_url  # db 15 of the test Redis; keys are namespaced by the prefix
    config = load_config(None, task={"labels": sorted(WORDS)}, llm={"name": LLM},
                         kafka={"bootstrap_servers": kafka_bootstrap, "topic_prefix": prefix, "partitions": 2},
                         redis={"url": db_url, "key_prefix": prefix}, state={"backend": "redis"},
                         deferral={"warmup": 100, "mu": 0.3})
    ensure_topics(kafka_bootstrap, Topics(config).all(), 2)
    return config


def events(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice(sorted(WORDS))
        text = f"event {i} we felt {rng.choice(WORDS[label])} about it"
        out.append({"id": f"e{i}", "text": text, "llm": {LLM: label}})
    return out


def produce(config, payloads: list[bytes], keys: list[bytes]) -> None:
    producer = make_producer(config.kafka)
    try:
        produce_and_flush(producer, [OutRecord(Topics(config).events, k, v) for k, v in zip(keys, payloads)])
    finally:
        producer.close()


def produce_rows(config, rows: list[dict]) -> None:
    produce(config, [json.dumps(r).encode() for r in rows], [r["id"].encode() for r in rows])


def assert_one_decision_each(config, rows: list[dict], found: dict) -> list[Decision]:
    """Every event has a decision, and the decisions topic holds exactly one per event."""
    assert set(found) == {r["id"] for r in rows}
    decisions = [Decision.model_validate_json(v) for v in read_all(config, Topics(config).decisions)]
    ids = [d.event_id for d in decisions]
    assert len(ids) == len(set(ids)) == len(rows)
    return decisions


def read_all(config, topic: str, idle_s: float = 3.0) -> list[bytes]:
    consumer = KafkaConsumer(topic, bootstrap_servers=config.kafka.bootstrap_servers, group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=int(idle_s * 1000))
    try:
        return [rec.value for rec in consumer]
    finally:
        consumer.close()


def test_every_event_gets_exactly_one_decision_through_two_tiers(pipeline_config, tmp_path):
    config = pipeline_config.model_copy(update={"tiers": [
        pipeline_config.tiers[0].model_copy(update={"name": "fast"}),
        pipeline_config.tiers[0].model_copy(update={"name": "second", "cost": 5.0}),
    ]})
    ensure_topics(config.kafka.bootstrap_servers, Topics(config).all(), 2)
    rows = events(2000)
    procs = start_workers(config, tmp_path, free_port())
    try:
        produce_rows(config, rows)
        found = collect_decisions(config, {r["id"] for r in rows}, timeout_s=180, progress=False)
        routing = make_state(config).get_routing()
    finally:
        stop_workers(procs)
    decisions = assert_one_decision_each(config, rows, found)
    assert {d.reason for d in decisions} <= {"llm", "tier", "cache"}
    assert any(d.tier == "llm" for d in decisions)
    assert set(routing) == {"fast", "second"}  # both stages shared their routing for the deferral costs
    # Events deferred (not explored) to the LLM passed through both tiers, whose versions they record.
    assert all(set(d.model_versions) == {"fast", "second"} for d in decisions if d.reason == "llm" and not d.explored)
    assert all(p.returncode == 0 for p in procs)  # SIGTERM: clean exit


def test_kill_9_of_a_tier_worker_loses_nothing_and_duplicates_nothing(pipeline_config, tmp_path):
    rows = events(3000, seed=1)
    port = free_port()
    procs = start_workers(pipeline_config, tmp_path, port)
    tier_cmd = procs[0].args
    try:
        produce_rows(pipeline_config, rows[:1500])
        time.sleep(4)  # in the middle of the stream
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        produce_rows(pipeline_config, rows[1500:])
        logf = (tmp_path / "tier-restarted.log").open("ab")
        procs[0] = subprocess.Popen(tier_cmd, stdout=logf, stderr=logf, env=dict(os.environ))
        found = collect_decisions(pipeline_config, {r["id"] for r in rows}, timeout_s=240, progress=False)
    finally:
        stop_workers(procs)
    assert_one_decision_each(pipeline_config, rows, found)


def test_malformed_events_are_dead_lettered_and_the_rest_answered(pipeline_config, tmp_path):
    rows = events(300, seed=2)
    good = [json.dumps(r).encode() for r in rows]
    bad = {
        "invalid_json": b"{not json",
        "missing_text": json.dumps({"id": "m1", "llm": {LLM: "joy"}}).encode(),
        "missing_id": json.dumps({"text": "hello", "llm": {LLM: "joy"}}).encode(),
        "not_an_object": b"[1, 2, 3]",
        "too_large": json.dumps({"id": "big", "text": "x" * 200_000}).encode(),
    }
    payloads = good[:150] + list(bad.values()) + good[150:]
    keys = [r["id"].encode() for r in rows[:150]] + [k.encode() for k in bad] + [r["id"].encode() for r in rows[150:]]
    procs = start_workers(pipeline_config, tmp_path, free_port())
    try:
        produce(pipeline_config, payloads, keys)
        found = collect_decisions(pipeline_config, {r["id"] for r in rows}, timeout_s=120, progress=False)
        time.sleep(1)
    finally:
        stop_workers(procs)
    assert set(found) == {r["id"] for r in rows}
    letters = [DeadLetter.model_validate_json(v) for v in read_all(pipeline_config, Topics(pipeline_config).deadletter)]
    by_reason = {d.reason: d for d in letters}
    assert set(by_reason) == set(bad)
    for reason, raw in bad.items():
        assert base64.b64decode(by_reason[reason].original_b64) == raw  # nothing lost
        assert by_reason[reason].detail
    assert all(p.returncode == 0 for p in procs)


def wait_ready(cmd: list[str], timeout_s: float = 120.0) -> None:
    """Until the worker started with ``cmd`` answers /readyz (joined its group, consuming)."""
    port = cmd[cmd.index("--metrics-port") + 1]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"worker on port {port} not ready in {timeout_s} s")


def test_rebalances_lose_nothing(pipeline_config, tmp_path):
    """A second replica joins mid-stream, then the first leaves on SIGTERM: two rebalances."""
    rows = events(3000, seed=3)
    procs = start_workers(pipeline_config, tmp_path, free_port())
    replica_cmd = list(procs[0].args)
    replica_cmd[replica_cmd.index("--metrics-port") + 1] = str(free_port())
    try:
        wait_ready(procs[0].args)
        produce_rows(pipeline_config, rows[:1000])
        logf = (tmp_path / "tier-replica.log").open("ab")
        procs.append(subprocess.Popen(replica_cmd, stdout=logf, stderr=logf, env=dict(os.environ)))
        produce_rows(pipeline_config, rows[1000:2000])
        wait_ready(replica_cmd)  # joined: the group rebalanced onto two members
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(30) == 0  # finished its batch, committed, left the group
        produce_rows(pipeline_config, rows[2000:])
        found = collect_decisions(pipeline_config, {r["id"] for r in rows}, timeout_s=240, progress=False)
    finally:
        stop_workers(procs)
    assert_one_decision_each(pipeline_config, rows, found)
    assert "started" in (tmp_path / "tier-replica.log").read_text()


def test_the_contract_runs_across_the_workers(pipeline_config, tmp_path):
    """Tier workers audit, the LLM worker estimates and steers, the tier workers follow its thresholds."""
    from cascade.evaluation.data import LabelledEvent
    from cascade.messages import Event
    from workers.run import run_pipeline

    config = pipeline_config.model_copy(update={
        "deferral": pipeline_config.deferral.model_copy(update={"mu": None}),  # no fixed price: the contract
        "contract": pipeline_config.contract.model_copy(update={"min_agreement": 0.9, "audit_rate": 0.1,
                                                                "update_every": 50}),
    })
    assert config.contract_on
    rows = [LabelledEvent(Event(id=r["id"], text=r["text"], payload=r), r["llm"][LLM]) for r in events(3000, seed=4)]
    report, found = run_pipeline(config, rows, tmp_path, free_port(), timeout_s=240, progress=False, rate=200)
    assert report is not None and set(found) == {r.event.id for r in rows}
    assert report.audit_calls > 0
    assert report.llm_calls == report.per_tier["llm"].answered + report.audit_calls
    assert report.contract is not None and report.agreement_lower_bound is not None
    assert 0.5 < report.agreement_lower_bound <= report.contract.estimated_agreement <= 1.0
    live = make_state(config).get_live_params()
    assert live is not None and "logistic" in live.thresholds  # written by the LLM worker's controller
    assert "live_params_applied" in (tmp_path / "tier-logistic.log").read_text()  # and followed by the tier
    assert report.per_tier["logistic"].answered > 500  # the tier answers under the contract's threshold
