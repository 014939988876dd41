"""`cascade run` with `output.mode: enriched` from the environment: the workers as processes on a
real Tansu broker and a real Redis emit every event once, enriched, and the report reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from kafka import KafkaConsumer

from cascade.config import OutputConfig
from devtools.services import free_port
from tests.e2e.test_pipeline import LLM, events
from workers.output import read_output

pytestmark = pytest.mark.e2e


def test_cascade_run_with_enriched_output(kafka_bootstrap, redis_url, tmp_path):
    rows = [{**r, "label": r["llm"][LLM], "shop": {"id": i % 7}} for i, r in enumerate(events(1200, seed=5))]
    data = tmp_path / "stream.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_id = uuid.uuid4().hex[:8]
    env = {**os.environ, "CASCADE_OUTPUT__MODE": "enriched", "CASCADE_OUTPUT__FIELD": "decided",
           "CASCADE_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "CASCADE_KAFKA__PARTITIONS": "2",
           "CASCADE_REDIS__URL": redis_url, "CASCADE_STATE__BACKEND": "redis", "CASCADE_DEFERRAL__WARMUP": "100"}
    env.pop("CASCADE_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", "run", "--data", str(data), "--llm", LLM, "--mu", "0.3", "--rate", "80",
         "--run-id", run_id, "--run-dir", str(tmp_path / "run"), "--base-port", str(free_port()), "--timeout", "240",
         "--json", "--quiet"],
        env=env, capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # The report read every decision back from the enriched records; paced, so the tier learned in time.
    assert report["events"] == len(rows) and report["accuracy"] > 0.9 and 0 < report["llm_calls"] < len(rows)

    consumer = KafkaConsumer(f"cascade.{run_id}.decisions", bootstrap_servers=kafka_bootstrap, group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=3000)
    try:
        records = list(consumer)
    finally:
        consumer.close()
    output = OutputConfig(mode="enriched", field="decided")
    sent = {r["id"]: {k: v for k, v in r.items() if k != "label"} for r in rows}  # gold labels stay behind
    seen = [read_output(r.value, output) for r in records]
    assert sorted(b.decision.event_id for b in seen) == sorted(sent)  # every event decided once
    assert all(r.key == b.decision.event_id.encode() for r, b in zip(records, seen))  # the feeder keys by id
    assert all(b.event == sent[b.decision.event_id] for b in seen)
    assert {b.decision.tier for b in seen} == {"logistic", "llm"}
