"""Loud misconfiguration: LLM answers that map to no label, and a fresh group reading decided events
(workers with memory state and metrics_port=0, records handed to them directly)."""

from __future__ import annotations

import json

from structlog.testing import capture_logs

from cascade.config import load_config
from cascade.evaluation.data import LabelledEvent
from cascade.messages import Deferred, Event, TierOutput
from tests.records import Rec
from workers.cli import _print_report
from workers.llm_worker import LLMWorker
from workers.observability import FreshGroupWatch, UnmappedWatch
from workers.run import llm_worker_metrics, score
from workers.tier_worker import TierWorker

LLM = "test-llm"




def config():
    return load_config(None, task={"labels": ["fear", "joy"]}, llm={"name": LLM}, server={"metrics_port": 0})


def deferred(i: int, answer: str) -> Rec:
    out = TierOutput(tier="logistic", version=300, probs=[0.8, 0.2], policy_features=[0.8], p_agree=0.5)
    d = Deferred(event=Event(id=f"e{i}", text=f"text number {i}", payload={"llm": {LLM: answer}}), outputs=[out], cost=1.0)
    return Rec("cascade.llm", 0, i, d.event.id.encode(), d.model_dump_json().encode())


def event(i: int) -> Rec:
    return Rec("cascade.events", 0, i, f"ev{i}".encode(), json.dumps({"id": f"ev{i}", "text": f"we felt {i}"}).encode())


def warnings(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def test_unmapped_llm_answers_warn_rate_limited_and_set_the_gauge():
    w = LLMWorker(config(), metrics_port=0)
    try:
        batch = [deferred(i, "banana" if i % 3 == 0 else "joy") for i in range(30)]
        with capture_logs() as logs:
            w.process(batch)
            w.process([deferred(100 + i, "banana") for i in range(5)])  # within the minute: no second warning
        [warn] = warnings(logs, "llm_answers_unmapped")
        assert warn["log_level"] == "warning" and warn["labels"] == ["fear", "joy"]
        assert warn["examples"] and set(warn["examples"]) == {"banana"} and len(warn["examples"]) <= 5
        assert warn["ratio"] > 0.2
        gauge = w.metrics.registry.get_sample_value("cascade_llm_unmapped_ratio", {"role": "llm"})
        assert gauge is not None and abs(gauge - 15 / 35) < 1e-9
    finally:
        w.health.close()


def test_mapped_llm_answers_stay_quiet():
    w = LLMWorker(config(), metrics_port=0)
    try:
        with capture_logs() as logs:
            w.process([deferred(i, "banana" if i % 10 == 0 else "joy") for i in range(50)])  # 10%
        assert not warnings(logs, "llm_answers_unmapped")
        assert w.metrics.registry.get_sample_value("cascade_llm_unmapped_ratio", {"role": "llm"}) == 0.1
    finally:
        w.health.close()


def test_unmapped_watch_window_and_rate_limit():
    now = [0.0]
    watch = UnmappedWatch(window=100, threshold=0.2, min_answers=20, every_s=60, clock=lambda: now[0])
    assert not any(watch.add("x", False) for _ in range(19))  # too few answers yet
    assert watch.add("x", False)
    assert not watch.add("x", False)
    now[0] = 61.0
    assert watch.add("x", False)
    for _ in range(100):
        watch.add("joy", True)
    assert watch.ratio == 0.0  # only the last 100 count


def test_fresh_group_reading_decided_events_warns_once():
    w = TierWorker(config(), "logistic", metrics_port=0)
    try:
        w.state.claim_events([f"ev{i}" for i in range(60)])  # decided before, in this pipeline's state
        w.fresh_group = True
        with capture_logs() as logs:
            for start in range(0, 60, 12):
                w.process([event(i) for i in range(start, start + 12)])
            w.process([event(i) for i in range(12)])
        [warn] = warnings(logs, "duplicates_on_fresh_group")
        assert warn["records"] == 60 and warn["duplicates"] == 60 and warn["pipeline"] == "cascade"
    finally:
        w.health.close()


def test_no_warning_for_an_old_group_or_new_events():
    for fresh, decided in ((False, 60), (True, 10)):
        w = TierWorker(config(), "logistic", metrics_port=0)
        try:
            w.state.claim_events([f"ev{i}" for i in range(decided)])
            w.fresh_group = fresh
            with capture_logs() as logs:
                for start in range(0, 60, 12):
                    w.process([event(i) for i in range(start, start + 12)])
            assert not warnings(logs, "duplicates_on_fresh_group")
        finally:
            w.health.close()


def test_fresh_group_watch_decides_after_the_first_batches():
    watch = FreshGroupWatch(batches=3, min_records=1000, threshold=0.9)
    assert not watch.add(10, 10) and not watch.add(10, 10)
    assert watch.add(10, 9)
    assert not watch.add(10, 10)  # once


def test_the_run_report_shows_the_llm_workers_unmapped_ratio(capsys):
    """`cascade run` reads the ratio from the LLM worker's /metrics into its report."""
    cfg = config()
    w = LLMWorker(cfg, metrics_port=0)
    try:
        w.process([deferred(i, "banana" if i % 2 else "joy") for i in range(40)])
        metrics = llm_worker_metrics(w.health.port)
    finally:
        w.health.close()
    rows = [LabelledEvent(Event(id=f"e{i}", text="t", payload={"llm": {LLM: "joy"}}), "joy") for i in range(2)]
    report = score(cfg, rows, {}, 1.0, metrics)
    assert report.llm_unmapped_ratio == 0.5
    _print_report(report)
    assert "LLM unmapped      50% of the last 100 answers named no label   <- check task.labels" in capsys.readouterr().out
    quiet = score(cfg, rows, {}, 1.0, {**metrics, ("cascade_llm_unmapped_ratio", ""): 0.05})
    _print_report(quiet)
    out = capsys.readouterr().out
    assert "LLM unmapped      5% of the last 100" in out and "<- check" not in out
