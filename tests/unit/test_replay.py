"""Replay offline: sweep syntax, joining recorded answers, the sweep engine, targets, the plot, the CLI."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import structlog

from cascade.config import CascadeConfig, ConfigError, LLMConfig, load_config
from cascade.messages import Event, LiveParams
from cascade.replay.analysis import Target, TargetError, mark_pareto, parse_target, quality_metric, recommend
from cascade.replay.command import Loaded, event_rate, replay
from cascade.replay.engine import PointResult, replay_config, run_sweep
from cascade.replay.join import MISSING, JoinedAnswers, RecordedEvent, join_answers
from cascade.replay.sweep import SweepError, parse_sweep, parse_values
from cascade.routing.cascade import Cascade
from cascade.task import Task
from cascade.tiers.llm import LLMError
from tests.unit.streams import LLM, easy_and_hard
from workers import cli


@pytest.fixture(autouse=True)
def _restore_logging():
    """cli.main configures structlog to print to the (captured) stderr of the moment: undo it after."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def make_config(**deferral) -> CascadeConfig:
    return load_config(None, task={"labels": ["fear", "joy"]}, llm={"name": LLM}, features={"n_features": 2**16},
                       deferral={"warmup": 50, "mu": 0.2, **deferral})


# ------------------------------------------------------------------ sweep syntax


def test_sweep_values_lin_log_and_lists():
    assert parse_values("0:1:lin5") == [0.0, 0.25, 0.5, 0.75, 1.0]
    log = parse_values("0.1:10:log3")
    assert [round(v, 9) for v in log] == [0.1, 1.0, 10.0]
    assert len(parse_values("0.1:10:log20")) == 20
    assert parse_values("0.3,1, 2") == [0.3, 1.0, 2.0]
    assert parse_values("0.5") == [0.5]
    for bad in ("0:1:log3", "a:1:lin2", "1:2", "0.1:1:exp3", "", "nan"):
        with pytest.raises(SweepError):
            parse_values(bad)


def test_sweep_grid_names_and_params():
    settings = parse_sweep(["mu=0.1,0.2", "threshold.logistic=0.3:0.4:lin2"], ["logistic"])
    assert [s.as_dict() for s in settings] == [
        {"mu": 0.1, "threshold.logistic": 0.3}, {"mu": 0.1, "threshold.logistic": 0.4},
        {"mu": 0.2, "threshold.logistic": 0.3}, {"mu": 0.2, "threshold.logistic": 0.4},
    ]
    params = settings[1].params(LiveParams(mu=1.0, thresholds={"other": 0.9}))
    assert params.mu == 0.1 and params.thresholds == {"other": 0.9, "logistic": 0.4}
    assert params.exploration_scale == 0.0  # replays run with exploration off
    assert settings[0].label() == "mu=0.1 threshold.logistic=0.3"
    for bad in (["tau=1"], ["threshold.nope=0.1"], ["mu=-1"], ["mu=1", "mu=2"], ["mu"], []):
        with pytest.raises(SweepError):
            parse_sweep(bad, ["logistic"])


# ------------------------------------------------------------------ joining answers


def rec(i: int, answer: str | None | object = "joy", gold: str | None = None) -> RecordedEvent:
    payload: dict = {"id": str(i), "text": f"text {i}"}
    if answer is not MISSING:
        payload["llm"] = {LLM: answer}
    return RecordedEvent(Event(id=str(i), text=f"text {i}", payload=payload), gold, 1000 * i)


def test_join_prefers_cache_then_demonstrations_then_decisions_then_field():
    rows = [rec(0), rec(1), rec(2), rec(3), rec(4, MISSING), rec(5, None), rec(1)]
    cache_calls = []

    def cache(events):
        cache_calls.append([e.id for e in events])
        return ["fear" if e.id == "0" else MISSING for e in events]

    joined = join_answers(rows, LLMConfig(name=LLM), cache=cache, demonstrations={"0": "joy", "1": "fear"},
                          decisions={"1": "joy", "2": None})
    assert joined.answers == {"0": "fear", "1": "fear", "2": None, "3": "joy", "5": None}
    assert joined.sources == Counter({"cache": 1, "demonstrations": 1, "decisions": 1, "field": 2})
    assert joined.missing == ["4"] and joined.missing_llm_answers == 1
    assert joined.duplicates == 1
    assert [r.event.id for r in joined.events] == ["0", "1", "2", "3", "5"]
    assert cache_calls == [["0", "1", "2", "3", "4", "5"]]


def test_joined_answers_backend_never_guesses():
    task = Task(make_config().task)
    backend = JoinedAnswers(task, LLMConfig(name=LLM), {"a": "joy", "b": None})
    a = Event(id="a", text="x", payload={"llm": {LLM: "fear"}})  # the join decided: the carried answer is ignored
    answers = backend.answer([a, Event(id="b", text="y")])
    assert [x.label for x in answers] == ["joy", None]
    with pytest.raises(LLMError) as err:
        backend.answer([Event(id="c", text="z", payload={"llm": {LLM: "joy"}})])
    assert err.value.reason == "no_recorded_answer" and not err.value.retryable


# ------------------------------------------------------------------ the sweep engine


def stream(n: int, seed: int) -> list[RecordedEvent]:
    return [RecordedEvent(e, e.payload["llm"][LLM], 1000 * i) for i, (e, _) in enumerate(easy_and_hard(n, seed))]


def test_sweep_is_monotone_deterministic_and_parallel_matches_sequential():
    config = make_config(exploration_max=0.3, exploration_min=0.1)  # live exploration that the replay turns off
    joined = join_answers(stream(900, seed=11), config.llm)
    settings = parse_sweep(["mu=0.02:1:log6"], ["logistic"])
    seq = run_sweep(config, joined, settings, processes=1, progress=False)
    par = run_sweep(config, joined, settings, processes=2, progress=False)
    strip = lambda ps: [p.model_dump(exclude={"seconds", "cpu_seconds"}) for p in ps]  # noqa: E731
    assert strip(seq) == strip(par)
    fractions = [p.llm_call_fraction for p in seq]
    assert fractions == sorted(fractions, reverse=True), fractions
    assert fractions[0] > fractions[-1]
    assert all(p.events == 900 for p in seq)
    assert seq[0].agreement_with_llm > 0.95 and seq[0].accuracy == seq[0].agreement_with_llm  # gold = LLM here
    assert math.isclose(sum(seq[0].per_tier.values()), 1.0)


def test_threshold_sweep_is_monotone():
    config = make_config()
    joined = join_answers(stream(600, seed=12), config.llm)
    points = run_sweep(config, joined, parse_sweep(["threshold.logistic=0:0.6:lin4"], ["logistic"]),
                       processes=1, progress=False)
    fractions = [p.llm_call_fraction for p in points]
    assert fractions == sorted(fractions, reverse=True) and fractions[0] > fractions[-1]


def test_events_without_an_answer_are_counted_and_never_scored(tmp_path):
    config = make_config()
    rows = stream(300, seed=13)
    holes = {rows[i].event.id for i in (5, 50, 150)}
    for r in rows:
        if r.event.id in holes:
            r.event.payload.pop("llm")
    report = replay(config, Loaded(rows, "test", "file"), parse_sweep(["mu=0.1,0.5"], ["logistic"]),
                    plot=None, processes=1, progress=False, live_sources=False)
    assert report.missing_llm_answers == 3 and set(report.missing_ids) == holes
    assert report.events_read == 300 and report.events_replayed == 297
    assert all(p.events == 297 for p in report.points)
    assert report.answer_sources == {"field": 297}


def test_event_rate_from_timestamps():
    rows = [rec(i) for i in range(5)]  # one event per second
    assert event_rate(rows) == pytest.approx(3600.0)
    assert event_rate([rec(0)]) is None
    assert event_rate([RecordedEvent(Event(id="x", text="t"), None, None)] * 3) is None


# ------------------------------------------------------------------ targets and the front


def point(label: str, frac: float, agree: float | None, acc: float | None = None, cph: float | None = None) -> PointResult:
    return PointResult(
        setting={}, label=label, mu=0.0, thresholds={}, events=100, llm_calls=int(frac * 100), llm_call_fraction=frac,
        agreement_with_llm=agree, disagreement=None if agree is None else 1 - agree, accuracy=acc,
        total_cost=frac * 10000, cost_per_event=frac * 100 + 1, cost_per_hour=cph, per_tier={}, llm_unusable=0,
        seconds=0.0,
    )


def test_pareto_and_recommendations():
    pts = [point("a", 0.9, 0.99, 0.80, 900), point("b", 0.5, 0.90, 0.78, 500), point("c", 0.6, 0.85, 0.70, 600),
           point("d", 0.1, 0.60, 0.50, 100)]
    metric = quality_metric(pts)
    assert metric == "accuracy"
    mark_pareto(pts, metric)
    assert [p.pareto for p in pts] == [True, True, False, True]
    assert recommend(pts, Target("min_accuracy", 0.75), metric).label == "b"  # cheapest meeting it
    assert recommend(pts, Target("max_disagreement", 0.05), metric).label == "a"
    assert recommend(pts, Target("budget_per_hour", 650), metric).label == "b"  # best within the budget
    assert recommend(pts, Target("max_llm_fraction", 0.2), metric).label == "d"
    none = recommend(pts, Target("min_accuracy", 0.95), metric)
    assert none.index is None and "closest is a" in none.reason
    nogold = [point("a", 0.9, 0.99), point("b", 0.5, 0.9)]
    assert quality_metric(nogold) == "agreement_with_llm"
    with pytest.raises(TargetError):
        recommend(nogold, Target("min_accuracy", 0.5), "agreement_with_llm")
    with pytest.raises(TargetError):
        recommend(nogold, Target("budget_per_hour", 5), "agreement_with_llm")  # no event rate
    assert parse_target("budget_per_hour=12.5") == Target("budget_per_hour", 12.5)
    for bad in ("accuracy=1", "min_accuracy", "min_accuracy=x", "max_disagreement=-1"):
        with pytest.raises(TargetError):
            parse_target(bad)


# ------------------------------------------------------------------ the command


def write_stream(path, n: int, seed: int, holes: int = 0) -> None:
    with path.open("w") as f:
        for i, (e, _) in enumerate(easy_and_hard(n, seed)):
            row = {"id": e.id, "text": e.text, "label": e.payload["llm"][LLM], "llm": e.payload["llm"]}
            if i < holes:
                row.pop("llm")
            f.write(json.dumps(row) + "\n")


def test_cli_replay_of_a_file_prints_json_and_writes_the_plot(tmp_path, capsys):
    data = tmp_path / "s.jsonl"
    write_stream(data, 500, seed=14, holes=2)
    png = tmp_path / "out" / "replay.png"
    code = cli.main(["replay", "--data", str(data), "--llm", LLM, "--sweep", "mu=0.05:0.5:log3",
                     "--target", "min_accuracy=0.5", "--plot", str(png), "--json", "--quiet", "--processes", "1",
                     "--events-per-hour", "3600"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["missing_llm_answers"] == 2 and report["events_replayed"] == 498
    assert report["quality_metric"] == "accuracy"
    assert report["recommendation"]["index"] is not None
    assert report["points"][0]["cost_per_hour"] == pytest.approx(report["points"][0]["cost_per_event"] * 3600)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_replay_table_and_unmet_target(tmp_path, capsys):
    data = tmp_path / "s.jsonl"
    write_stream(data, 300, seed=15)
    code = cli.main(["replay", "--data", str(data), "--llm", LLM, "--sweep", "mu=0.1,1", "--no-plot", "--quiet",
                     "--processes", "1", "--from", "100", "--to", "250", "--target", "min_accuracy=1.01"])
    out = capsys.readouterr().out
    assert code == 3  # no setting meets the target
    assert "mu=0.1" in out and "mu=1" in out and "no setting meets min_accuracy=1.01" in out
    assert "replayed 150" in out


def test_cli_replay_apply_needs_a_target_and_redis(tmp_path):
    data = tmp_path / "s.jsonl"
    write_stream(data, 100, seed=16)
    assert cli.main(["replay", "--data", str(data), "--llm", LLM, "--apply", "--no-plot", "--quiet"]) == 2
    assert cli.main(["replay", "--data", str(data), "--llm", LLM, "--sweep", "mu=1", "--apply", "--no-plot",
                     "--quiet", "--target", "max_llm_fraction=1", "--processes", "1"]) == 2  # state.backend memory
    with pytest.raises(ConfigError):
        replay(make_config(), Loaded([], "x", "file"), parse_sweep(["mu=1"], ["logistic"]), progress=False,
               live_sources=False)


def test_cli_replay_checks_the_target_before_the_sweep_and_applies_nothing_unmet(tmp_path, capsys, monkeypatch):
    data = tmp_path / "s.jsonl"
    with data.open("w") as f:
        for e, _ in easy_and_hard(100, seed=17):
            f.write(json.dumps({"id": e.id, "text": e.text, "llm": e.payload["llm"]}) + "\n")  # no gold
    swept = []
    monkeypatch.setattr("cascade.replay.command.run_sweep", lambda *a, **k: swept.append(1) or [])
    args = ["replay", "--data", str(data), "--llm", LLM, "--no-plot", "--quiet", "--processes", "1"]
    assert cli.main(args + ["--target", "min_accuracy=0.5"]) == 2  # no gold labels
    assert cli.main(args + ["--target", "budget_per_hour=10"]) == 2  # no event rate
    assert swept == []
    assert "needs gold labels" in capsys.readouterr().err


def test_warm_start_replays_from_the_given_snapshots():
    config = make_config()
    trained = Cascade(config)
    for e, _ in easy_and_hard(1500, seed=18):
        trained.process([e])
    snaps = {"logistic": (trained.stages[0].tier.snapshot(), trained.stages[0].policy.snapshot())}
    joined = join_answers(stream(200, seed=19), config.llm)
    settings = parse_sweep(["mu=0.2"], ["logistic"])
    cold = run_sweep(config, joined, settings, processes=1, progress=False)[0]
    warm = run_sweep(config, joined, settings, processes=1, progress=False, snapshots=snaps)[0]
    assert cold.llm_call_fraction > 0.25  # the first 50 events are warm-up
    assert warm.llm_call_fraction < cold.llm_call_fraction - 0.1
    assert warm.agreement_with_llm > 0.9


def test_a_replay_runs_its_settings_without_the_default_contract() -> None:
    # The default config holds a contract (min_agreement 0.95); replayed, it would move every
    # sweep point's mu and add audit calls, so the sweep's curve would not be the settings'.
    config = CascadeConfig()
    assert config.contract_on
    replayed = replay_config(config)
    assert not replayed.contract_on
    assert replayed.contract.audit_rate == config.contract.audit_rate  # untouched, merely unused
