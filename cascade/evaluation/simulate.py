"""``cascade simulate``: stream a recorded file through the in-process cascade and score it."""

from __future__ import annotations

import time
from pathlib import Path

from cascade.config import CascadeConfig
from cascade.evaluation.data import LabelledEvent, batches, read_stream
from cascade.evaluation.progress import Progress
from cascade.evaluation.report import Report, Scorer
from cascade.routing.cascade import Cascade
from cascade.tiers.llm import RecordedAnswers


def simulate(
    config: CascadeConfig,
    rows: list[LabelledEvent],
    batch_size: int = 1,
    progress: bool = True,
) -> Report:
    return simulate_scored(config, rows, batch_size, progress)[0]


def simulate_scored(
    config: CascadeConfig, rows: list[LabelledEvent], batch_size: int = 1, progress: bool = True,
) -> tuple[Report, Scorer]:
    """``simulate``, with the scorer's per-event record (benchmarks score blocks of the stream)."""
    cascade = Cascade(config)
    recorded = cascade.llm if isinstance(cascade.llm, RecordedAnswers) else None
    scorer = Scorer(cascade.task.labels)
    bar = Progress(len(rows), "simulate", enabled=progress)
    start = time.perf_counter()
    done = 0
    for batch in batches(rows, batch_size):
        step = cascade.step([r.event for r in batch])
        for row, decision, outputs in zip(batch, step.decisions, step.outputs):
            llm_alone = cascade.task.map_answer(recorded.recorded(row.event)[1]) if recorded else None
            cheap_alone = outputs[0].label(cascade.task.labels) if outputs else None
            scorer.add_decision(row.gold, decision, llm_alone, cheap_alone)
        scorer.audit_calls += step.audit_calls
        done += len(batch)
        bar.update(done, f"llm {scorer.llm_calls / done:.2f}")
    seconds = time.perf_counter() - start
    status = cascade.contract.status() if cascade.contract is not None else None
    return scorer.report(seconds, {"mu": config.deferral.mu, "llm": config.llm.name, "seed": config.seed},
                         status), scorer


def simulate_file(
    config: CascadeConfig, path: Path, shuffle_seed: int | None = None, limit: int | None = None,
    batch_size: int = 1, progress: bool = True,
) -> Report:
    rows = read_stream(path, shuffle_seed=shuffle_seed, limit=limit)
    return simulate(config, rows, batch_size=batch_size, progress=progress)
