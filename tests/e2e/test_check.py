"""`cascade check`, the preflight, as a process against the real broker and Redis."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from devtools.services import free_port

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "isear.jsonl.gz"
GPT = "gpt-3.5-turbo-1106"
ISEAR_LABELS = ["joy", "sadness", "anger", "guilt", "shame", "fear", "disgust"]

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    if not DATA.exists():
        pytest.skip(f"real data not found at {DATA}: put ../shared/data beside the repository")
    out = tmp_path_factory.mktemp("data") / "isear-head.jsonl"
    with gzip.open(DATA, "rt") as f, out.open("w") as g:
        for _, line in zip(range(30), f):
            g.write(line)
    return out


def check(tmp_path: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "workers.cli", "--config", str(path), "check", *args],
                          capture_output=True, text=True, timeout=120)


def base(kafka_bootstrap: str, redis_url: str, labels: list[str]) -> dict:
    prefix = f"check{time.time_ns()}."
    return {"task": {"labels": labels}, "llm": {"name": GPT, "backend": "recorded"}, "deferral": {"mu": 0.3},
            "kafka": {"bootstrap_servers": kafka_bootstrap, "topic_prefix": prefix, "partitions": 1},
            "redis": {"url": redis_url, "key_prefix": prefix}, "state": {"backend": "redis"}}


def test_everything_reachable_and_the_answers_map(tmp_path, samples, kafka_bootstrap, redis_url):
    proc = check(tmp_path, base(kafka_bootstrap, redis_url, ISEAR_LABELS), "--data", str(samples), "--samples", "30", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {c["name"] for c in report["checks"]} >= {"kafka topics", "kafka produce", "kafka consume", "redis",
                                                    "llm calls", "llm answers map to labels"}
    assert all(c["ok"] for c in report["checks"])
    assert sum(r["count"] for r in report["answers"]) == 30
    assert report["unmapped_share"] < 0.2


def test_a_label_set_the_llm_does_not_answer_fails_before_anything_is_paid(tmp_path, samples, kafka_bootstrap, redis_url):
    proc = check(tmp_path, base(kafka_bootstrap, redis_url, ["pos", "neg"]), "--data", str(samples))
    assert proc.returncode == 1
    assert "FAIL  llm answers map to labels" in proc.stdout
    assert "NO LABEL" in proc.stdout and "'joy'" in proc.stdout  # the raw answers shown, mapped to nothing
    assert "check FAILED" in proc.stdout


def test_unreachable_services_fail_with_the_reason(tmp_path, kafka_bootstrap):
    config = base(f"127.0.0.1:{free_port()}", f"redis://127.0.0.1:{free_port()}/0", ISEAR_LABELS)
    proc = check(tmp_path, config, "--no-llm")
    assert proc.returncode == 1
    assert "FAIL  kafka topics" in proc.stdout and "FAIL  redis" in proc.stdout
