"""Broker and Redis outages mid-stream, the pipeline as processes on a Tansu and a Redis of each
test's own (devtools/faults.py): no worker exits, every event is decided exactly once, none is
lost or dead-lettered. The bench (bench/faults.py) runs the same scenarios on recorded data and
more events, and one more (Redis frozen alone, Redis restarted empty alone)."""

from __future__ import annotations

import pytest

from devtools.faults import FaultResult, run_scenario, synthetic_rows

pytestmark = pytest.mark.e2e
LLM = "test-llm"
EVENTS = 600
RATE = 60.0  # events a second: the stream lasts about 10 s, so the fault lands in it


def run(scenario: str, tmp_path) -> FaultResult:
    rows, labels = synthetic_rows(EVENTS, LLM)
    result = run_scenario(scenario, rows, labels, LLM, tmp_path / scenario, rate=RATE, timeout_s=150)
    assert result.worker_exits == {}, result
    assert 0 < result.decided_at_fault < EVENTS, result  # mid-stream
    assert (result.decided, result.duplicates, result.lost, result.dead_lettered) == (EVENTS, 0, 0, 0), result
    return result


def test_a_broker_frozen_15s_is_waited_out(tmp_path):
    run("tansu-freeze", tmp_path)


def test_a_broker_killed_and_restarted_empty_is_waited_out(tmp_path):
    # Memory storage: the topics are created and every event produced again after the restart;
    # those decided before it are recognised (idempotency records) and not decided again.
    run("tansu-restart", tmp_path)


def test_redis_frozen_then_restarted_empty_fail_open_decides_all_and_warns(tmp_path):
    result = run("redis-freeze-restart", tmp_path)
    assert result.loss_detected


def test_redis_restarted_empty_fail_closed_holds_llm_calls_until_confirmed(tmp_path):
    result = run("redis-restart-fail-closed", tmp_path)
    assert result.loss_detected and result.llm_held
