"""``cascade replay``: re-tune deferral on a recorded range without paying for the LLM again.

Load a recorded range (a topic range, or a file in the ``../shared/data`` format), join every
event with its recorded LLM answer, re-run the cascade offline for each sweep setting, print a
table, write a plot, recommend the setting for a target and, with ``apply``, make it the live
parameters that running tier workers poll.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pydantic import BaseModel

from cascade.config import CascadeConfig, ConfigError
from cascade.evaluation.data import read_stream
from cascade.learning.registry import latest_snapshots, model_names
from cascade.logging import get_logger
from cascade.messages import LiveParams
from cascade.replay.analysis import (
    Recommendation,
    Target,
    TargetError,
    check_target,
    format_table,
    mark_pareto,
    quality_metric,
    recommend,
)
from cascade.replay.engine import PointResult, run_sweep
from cascade.replay.join import Joined, RecordedEvent, join_answers, state_cache_lookup
from cascade.replay.sweep import Setting
from cascade.task import Task

log = get_logger("cascade.replay")
MISSING_IDS_SHOWN = 100


class ReplayReport(BaseModel):
    source: str
    kind: str  # "events", "decisions" or "file"
    ranges: dict[str, list[int]] = {}
    events_read: int
    invalid_events: dict[str, int] = {}
    duplicates: int
    events_replayed: int
    missing_llm_answers: int  # events without a recorded answer: not replayed, not scored
    missing_ids: list[str] = []  # the first MISSING_IDS_SHOWN of them
    answer_sources: dict[str, int]
    events_per_hour: float | None
    rate_from: str | None  # "timestamps", "given" or None
    quality_metric: str
    exploration_scale: float
    warm_start: dict[str, int] | None = None  # registry versions every setting started from
    llm_accuracy: float | None  # the recorded LLM alone against gold, on the replayed events
    points: list[PointResult]
    target: str | None = None
    recommendation: Recommendation | None = None
    applied: LiveParams | None = None
    plot: str | None = None
    seconds_load: float
    seconds_replay: float


@dataclass
class Loaded:
    rows: list[RecordedEvent]
    source: str
    kind: str
    ranges: dict[str, list[int]] = field(default_factory=dict)
    invalid: dict[str, int] = field(default_factory=dict)
    llm_decisions: dict[str, str | None] = field(default_factory=dict)
    seconds: float = 0.0


def load_file(path: Path, frm: int | None, to: int | None, shuffle_seed: int | None) -> Loaded:
    start = time.perf_counter()
    rows = read_stream(path, shuffle_seed=shuffle_seed)
    lo = 0 if frm is None else (len(rows) + frm if frm < 0 else frm)
    hi = len(rows) if to is None else (len(rows) + to if to < 0 else to)
    picked = rows[max(lo, 0) : max(hi, 0)]
    recorded = [RecordedEvent(r.event, r.gold, None) for r in picked]
    return Loaded(recorded, str(path), "file", {"rows": [lo, hi]}, seconds=time.perf_counter() - start)


DemonstrationSource = Callable[[set[str]], Mapping[str, str]]


def join(config: CascadeConfig, loaded: Loaded, live_sources: bool,
         demonstrations: DemonstrationSource | None = None) -> Joined:
    """Recorded answers: decision cache, demonstrations (LLM labels by id, for the ids asked),
    decisions range, event field. The cache is read only with ``live_sources``."""
    cache = demos = None
    state = None
    if live_sources and config.state.backend == "redis":
        from cascade.state import make_state

        state = make_state(config)
        cache = state_cache_lookup(state, Task(config.task))
    try:
        if live_sources and demonstrations is not None:
            demos = demonstrations({r.event.id for r in loaded.rows})
        joined = join_answers(loaded.rows, config.llm, cache=cache, demonstrations=demos,
                              decisions=loaded.llm_decisions or None)
        if state is not None and state.errors:  # an unreachable store degrades to cache misses
            log.warning("replay_cache_unreachable", errors=dict(state.errors))
        return joined
    finally:
        if state is not None:
            state.close()  # before the sweep forks


def event_rate(rows: Sequence[RecordedEvent]) -> float | None:
    """Events per hour from the records' timestamps (None without a time span)."""
    ts = [r.ts_ms for r in rows if r.ts_ms is not None and r.ts_ms >= 0]
    if len(ts) < 2 or max(ts) <= min(ts):
        return None
    return (len(ts) - 1) / ((max(ts) - min(ts)) / 3_600_000.0)


def published_snapshots(config: CascadeConfig) -> tuple[dict[str, tuple[bytes | None, bytes | None]], dict[str, int]]:
    """The current tier and policy snapshots in the model registry, per configured tier, and their versions."""
    from cascade.state import make_state

    out: dict[str, tuple[bytes | None, bytes | None]] = {}
    versions: dict[str, int] = {}
    with make_state(config) as state:
        for tier in config.tiers:
            found = latest_snapshots(state, tier.name)
            out[tier.name] = (found[0][1] if found[0] else None, found[1][1] if found[1] else None)
            versions.update({n: f[0] for n, f in zip(model_names(tier.name), found) if f is not None})
    return out, versions


def apply_params(config: CascadeConfig, point: PointResult) -> LiveParams:
    """Make a setting the live parameters; running workers pick it up on their next poll (~1 s).

    Exploration stays as it is live (the replay turns it off only to compare settings fairly).
    """
    if config.state.backend != "redis":
        raise ConfigError("--apply writes the live parameters to Redis: set state.backend=redis")
    from cascade.state import make_state

    with make_state(config) as state:
        current = state.get_live_params()
        params = LiveParams(mu=point.mu, thresholds=dict(point.thresholds),
                            exploration_scale=current.exploration_scale if current is not None else 1.0)
        state.set_live_params(params)
    log.info("replay_applied", mu=params.mu, thresholds=params.thresholds, exploration_scale=params.exploration_scale)
    return params


def replay(
    config: CascadeConfig, loaded: Loaded, settings: Sequence[Setting], *, target: Target | None = None,
    apply: bool = False, plot: Path | None = None, batch_size: int = 1, processes: int | None = None,
    events_per_hour: float | None = None, progress: bool = True, live_sources: bool = True,
    exploration_scale: float = 0.0, warm_start: bool = False, demonstrations: DemonstrationSource | None = None,
) -> ReplayReport:
    started = time.perf_counter()
    joined = join(config, loaded, live_sources, demonstrations)
    seconds_load = loaded.seconds + time.perf_counter() - started
    if joined.missing:
        log.warning("replay_missing_llm_answers", count=len(joined.missing), first=joined.missing[:5])
    if not joined.events:
        raise ConfigError(f"nothing to replay: {len(loaded.rows)} events read, none with a recorded answer "
                          f"of {config.llm.name}")
    rate_from: str | None
    rate, rate_from = (events_per_hour, "given") if events_per_hour else (event_rate(loaded.rows), "timestamps")
    if rate is None:
        rate_from = None
    if target is not None:  # fail before the sweep, not after it
        try:
            check_target(target, has_gold=any(r.gold is not None for r in joined.events), has_rate=rate is not None)
        except TargetError as e:
            raise ConfigError(f"replay: {e}") from None
    if apply and target is None:
        raise ConfigError("--apply needs a target (which setting to apply)")
    if apply and config.state.backend != "redis":
        raise ConfigError("--apply writes the live parameters to Redis: set state.backend=redis")
    snapshots: dict[str, tuple[bytes | None, bytes | None]] | None = None
    warm_versions: dict[str, int] = {}
    if warm_start:
        if config.state.backend != "redis":
            raise ConfigError("--warm-start reads the model registry in Redis: set state.backend=redis")
        snapshots, warm_versions = published_snapshots(config)
        if not warm_versions:
            raise ConfigError("--warm-start: the model registry holds no snapshot of any configured tier")
    t0 = time.perf_counter()
    points = run_sweep(config, joined, settings, batch_size=batch_size, processes=processes, progress=progress,
                       exploration_scale=exploration_scale, snapshots=snapshots)
    seconds_replay = time.perf_counter() - t0
    for p in points:
        if rate is not None:
            p.cost_per_hour = p.cost_per_event * rate
            p.llm_calls_per_hour = p.llm_call_fraction * rate
    metric = quality_metric(points)
    mark_pareto(points, metric)
    task = Task(config.task)
    gold = [(task.map_answer(joined.answers[r.event.id]), r.gold) for r in joined.events if r.gold is not None]
    report = ReplayReport(
        source=loaded.source, kind=loaded.kind, ranges=loaded.ranges, events_read=len(loaded.rows),
        invalid_events=loaded.invalid, duplicates=joined.duplicates, events_replayed=len(joined.events),
        missing_llm_answers=len(joined.missing), missing_ids=joined.missing[:MISSING_IDS_SHOWN],
        answer_sources=dict(joined.sources), events_per_hour=rate, rate_from=rate_from, quality_metric=metric,
        exploration_scale=exploration_scale, points=points,
        llm_accuracy=sum(a == g for a, g in gold) / len(gold) if gold else None,
        target=str(target) if target else None, seconds_load=seconds_load, seconds_replay=seconds_replay,
    )
    if snapshots is not None:
        report.warm_start = warm_versions
    if target is not None:
        report.recommendation = recommend(points, target, metric)
    if plot is not None:
        from cascade.replay.plot import write_plot

        title = (f"replay of {loaded.source}: {len(joined.events)} events, {len(joined.missing)} without an LLM answer"
                 + (f"; target {target}" if target else ""))
        rec = report.recommendation.index if report.recommendation else None
        report.plot = str(write_plot(plot, points, metric, title, rec, report.llm_accuracy if metric == "accuracy" else None))
    if apply:
        if report.recommendation is None:
            raise ConfigError("--apply needs a target (which setting to apply)")
        if report.recommendation.index is None:
            log.warning("replay_nothing_applied", reason=report.recommendation.reason)
        else:
            report.applied = apply_params(config, points[report.recommendation.index])
    return report


def print_report(r: ReplayReport, out: TextIO | None = None) -> None:
    w = (out or sys.stdout).write
    w(f"replay of {r.source} ({r.kind})" + (f" ranges {r.ranges}" if r.ranges else "") + "\n")
    w(f"events read {r.events_read}, replayed {r.events_replayed}, missing_llm_answers {r.missing_llm_answers}"
      f", duplicates {r.duplicates}" + (f", invalid {r.invalid_events}" if r.invalid_events else "") + "\n")
    if r.missing_ids:
        w(f"  without a recorded LLM answer (not replayed, not scored): {', '.join(r.missing_ids[:20])}"
          + (f" ... (+{r.missing_llm_answers - 20})" if r.missing_llm_answers > 20 else "") + "\n")
    w(f"answers from: {', '.join(f'{k} {v}' for k, v in sorted(r.answer_sources.items())) or '-'}\n")
    w(f"event rate: {'-' if r.events_per_hour is None else f'{r.events_per_hour:,.0f}/hour ({r.rate_from})'}"
      + ("" if r.llm_accuracy is None else f"; LLM alone accuracy {r.llm_accuracy:.4f}") + "\n")
    if r.warm_start:
        w(f"warm start from the registry: {', '.join(f'{k} v{v}' for k, v in sorted(r.warm_start.items()))}\n")
    explore = "exploration off" if r.exploration_scale == 0 else f"exploration x{r.exploration_scale:g}"
    w(f"quality: {r.quality_metric}; {explore}; {r.seconds_replay:.1f} s for {len(r.points)} settings\n\n")
    rec = r.recommendation.index if r.recommendation else None
    w(format_table(r.points, rec) + "\n\n")
    if r.recommendation is not None:
        if r.recommendation.index is None:
            w(f"target {r.recommendation.target}: {r.recommendation.reason}\n")
        else:
            w(f"recommended for {r.recommendation.target}: {r.recommendation.label} — {r.recommendation.reason}\n")
    if r.recommendation is not None and r.recommendation.index is None and r.applied is None:
        w("nothing applied\n")
    if r.applied is not None:
        w(f"applied to the live parameters: mu={r.applied.mu:.4g} thresholds={r.applied.thresholds} "
          f"exploration_scale={r.applied.exploration_scale:g}\n")
    if r.plot:
        w(f"plot: {r.plot}\n")
