"""`cascade simulate --json` as a process, on a slice of the real ISEAR stream."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "isear.jsonl.gz"
GPT = "gpt-3.5-turbo-1106"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def isear_slice(tmp_path_factory) -> Path:
    if not DATA.exists():
        pytest.skip(f"real data not found at {DATA}: put ../shared/data beside the repository")
    out = tmp_path_factory.mktemp("data") / "isear-slice.jsonl"
    with gzip.open(DATA, "rt") as f, out.open("w") as g:
        for i, line in zip(range(1200), f):
            g.write(line)
    return out


def simulate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", "simulate", *args], capture_output=True, text=True, timeout=300
    )


def test_simulate_json_report(isear_slice):
    proc = simulate("--data", str(isear_slice), "--llm", GPT, "--shuffle-seed", "0", "--mu", "0.3", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # exactly one JSON object; progress went to stderr
    r = json.loads(lines[0])
    assert r["events"] == 1200
    assert 0 < r["llm_calls"] <= 1200 and r["llm_call_fraction"] == pytest.approx(r["llm_calls"] / 1200)
    # The LLM alone on these rows, recomputed here from the file.
    rows = [json.loads(line) for line in isear_slice.read_text().splitlines()]
    llm_acc = sum(row["llm"][GPT] == row["label"] for row in rows) / len(rows)
    assert r["llm_accuracy"] == pytest.approx(llm_acc)
    assert 0.4 < r["accuracy"] <= 1 and 0 < r["macro_f1"] <= 1 and 0.5 < r["agreement_with_llm"] <= 1
    assert sum(t["answered"] for t in r["per_tier"].values()) == 1200
    assert r["per_tier"]["llm"]["answered"] >= 200  # the warm-up alone sends the first 200
    assert r["events_per_second"] > 0
    assert "simulate:" in proc.stderr  # progress


def test_simulate_is_deterministic(isear_slice):
    args = ("--data", str(isear_slice), "--llm", GPT, "--mu", "0.3", "--json", "--quiet", "--limit", "500")
    a, b = simulate(*args), simulate(*args)
    assert a.returncode == b.returncode == 0
    ra, rb = json.loads(a.stdout), json.loads(b.stdout)
    for key in ("llm_calls", "accuracy", "per_tier", "per_class", "explored"):
        assert ra[key] == rb[key]


def test_simulate_reports_bad_input_clearly(tmp_path, isear_slice):
    proc = simulate("--data", str(tmp_path / "nope.jsonl"), "--llm", GPT)
    assert proc.returncode == 2 and "not found" in proc.stderr
    bad = tmp_path / "c.yaml"
    bad.write_text("deferral:\n  mu: -3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "workers.cli", "--config", str(bad), "simulate", "--data", str(isear_slice), "--llm", GPT],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "deferral.mu" in proc.stderr
