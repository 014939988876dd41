"""Re-running the cascade offline over joined recorded events, once per sweep setting.

Each setting runs a fresh in-process ``Cascade`` (the same engine as ``cascade simulate``) whose
LLM is ``JoinedAnswers``: every LLM call of the replay is answered from the recordings, none is
made. Exploration is off, so a setting's outcome is a deterministic function of the stream.
Settings run in parallel processes (fork: the joined stream is shared copy-on-write).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from cascade.config import CascadeConfig
from cascade.evaluation.progress import Progress
from cascade.messages import LiveParams
from cascade.replay.join import Joined, JoinedAnswers
from cascade.replay.sweep import Setting
from cascade.routing.build import initial_params
from cascade.routing.cascade import Cascade
from cascade.task import Task


class PointResult(BaseModel):
    """What one setting did on the replayed stream."""

    setting: dict[str, float]
    label: str
    mu: float
    thresholds: dict[str, float]
    events: int
    llm_calls: int
    llm_call_fraction: float
    agreement_with_llm: float | None  # over events whose recorded LLM answer names a label
    disagreement: float | None
    accuracy: float | None  # over events with a gold label; None when there are none
    total_cost: float
    cost_per_event: float
    cost_per_hour: float | None = None  # at the recorded event rate
    llm_calls_per_hour: float | None = None
    per_tier: dict[str, float]  # fraction of events each tier (or "llm") answered
    llm_unusable: int
    seconds: float
    cpu_seconds: float = 0.0  # of this process, all its threads
    pareto: bool = False


def replay_config(config: CascadeConfig) -> CascadeConfig:
    """The config a replay runs with: recorded answers only, nothing shared, and no contract (each
    sweep point is a fixed setting; a contract would move it, and its audits would add LLM calls)."""
    return config.model_copy(update={
        "llm": config.llm.model_copy(update={"backend": "recorded", "recorded_path": None}),
        "state": config.state.model_copy(update={"backend": "memory"}),
        "contract": config.contract.model_copy(update={"min_agreement": None, "max_llm_fraction": None}),
    })


def run_point(
    config: CascadeConfig, joined: Joined, setting: Setting, base: LiveParams, batch_size: int = 1,
    counter: Any = None, on_batch: Any = None, exploration_scale: float = 0.0,
    snapshots: dict[str, tuple[bytes | None, bytes | None]] | None = None,
) -> PointResult:
    cfg = replay_config(config)
    cascade = Cascade(cfg, llm=JoinedAnswers(Task(cfg.task), cfg.llm, joined.answers))
    for stage in cascade.stages:  # warm start: the tiers and policies as published, not untrained
        tier_blob, policy_blob = (snapshots or {}).get(stage.tier.name, (None, None))
        if tier_blob is not None:
            stage.tier.restore(tier_blob)
        if policy_blob is not None:
            stage.policy.restore(policy_blob)
    params = setting.params(base, exploration_scale=exploration_scale)
    cascade.set_params(params)
    task = cascade.task
    rows = joined.events
    n = len(rows)
    llm_calls = unusable = agree = agree_n = correct = gold_n = unreported = 0
    cost = 0.0
    tiers: Counter[str] = Counter()
    start, cpu = time.perf_counter(), time.process_time()
    for lo in range(0, n, batch_size):
        batch = rows[lo : lo + batch_size]
        for r, d in zip(batch, cascade.process([r.event for r in batch])):
            cost += d.cost
            if d.reason in ("llm", "llm_unusable"):
                llm_calls += 1
                tiers["llm"] += 1
            else:
                tiers[d.tier] += 1
            unusable += d.reason == "llm_unusable"
            llm_label = task.map_answer(joined.answers[r.event.id])
            if llm_label is not None:
                agree_n += 1
                agree += d.label == llm_label
            if r.gold is not None:
                gold_n += 1
                correct += d.label is not None and d.label == r.gold
        unreported += len(batch)
        if unreported >= 256 or lo + batch_size >= n:  # progress: a shared counter, touched now and then
            if counter is not None:
                with counter.get_lock():
                    counter.value += unreported
            if on_batch is not None:
                on_batch(unreported)
            unreported = 0
    agreement = agree / agree_n if agree_n else None
    return PointResult(
        setting=setting.as_dict(), label=setting.label(), mu=params.mu, thresholds=params.thresholds,
        events=n, llm_calls=llm_calls, llm_call_fraction=llm_calls / n if n else 0.0,
        agreement_with_llm=agreement, disagreement=None if agreement is None else 1.0 - agreement,
        accuracy=correct / gold_n if gold_n else None,
        total_cost=cost, cost_per_event=cost / n if n else 0.0,
        per_tier={k: v / n for k, v in sorted(tiers.items())}, llm_unusable=unusable,
        seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu,
    )


# The job of a forked sweep: set before the pool forks, inherited by the children (not pickled).
_JOB: tuple[CascadeConfig, Joined, list[Setting], LiveParams, int, Any, float, Any] | None = None


def _run_one(i: int) -> tuple[int, PointResult]:
    assert _JOB is not None
    config, joined, settings, base, batch_size, counter, exploration, snapshots = _JOB
    return i, run_point(config, joined, settings[i], base, batch_size, counter=counter, exploration_scale=exploration,
                        snapshots=snapshots)


def run_sweep(
    config: CascadeConfig, joined: Joined, settings: Sequence[Setting], base: LiveParams | None = None,
    batch_size: int = 1, processes: int | None = None, progress: bool = True, exploration_scale: float = 0.0,
    snapshots: dict[str, tuple[bytes | None, bytes | None]] | None = None,
) -> list[PointResult]:
    """One result per setting, in the order given; settings run in up to ``processes`` processes.

    ``exploration_scale`` 0 (the default) turns exploration off: deterministic, monotone curves.
    Above 0 it replays the live exploration (seeded: still reproducible, not necessarily monotone).
    ``snapshots`` (tier name -> (tier bytes, policy bytes)) start every setting from those models.
    """
    global _JOB
    base = base or initial_params(config)
    settings = list(settings)
    total = len(settings) * len(joined.events)
    bar = Progress(total, f"replay ({len(settings)} settings x {len(joined.events)} events)", enabled=progress)
    workers = min(processes or os.cpu_count() or 1, len(settings))
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        done = 0

        def tick(k: int) -> None:
            nonlocal done
            done += k
            bar.update(done)

        return [run_point(config, joined, s, base, batch_size, on_batch=tick, exploration_scale=exploration_scale,
                          snapshots=snapshots) for s in settings]
    ctx = mp.get_context("fork")
    counter = ctx.Value("q", 0)
    _JOB = (config, joined, settings, base, batch_size, counter, exploration_scale, snapshots)
    try:
        with ctx.Pool(workers) as pool:
            pending = pool.map_async(_run_one, range(len(settings)), chunksize=1)
            while not pending.ready():
                pending.wait(0.5)
                bar.update(min(counter.value, total - 1))
            results = dict(pending.get())
    finally:
        _JOB = None
    bar.update(total)
    return [results[i] for i in range(len(settings))]
