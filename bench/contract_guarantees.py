"""The quality contract's guarantee rows: bound coverage over seeds, and recovery from drift.

    python bench/contract_guarantees.py [--data-dir /work/shared/data] [--seeds 20] [--jobs 2]
        [--target 0.95] [--only coverage|drift]

*Coverage.* Each stream (isear/GPT-3.5, hatespeech/Llama-2) is shuffled with seeds 0..N-1 (the
audit salt changes with the seed too, so every run draws its own audit sample) and run through the
in-process cascade with ``--min-agreement TARGET``. Every 500 events the contract's whole-stream
lower bound is compared with the true agreement of the decisions delivered so far with the
recorded LLM answers. PASS when the bound is at or below the truth at >= 95% of all
(seed, checkpoint) pairs (alpha = 0.05).

*Drift.* isear shuffled with seed 0; from event 4,000 on, the teacher's answers for two classes
are swapped (joy <-> sadness unless ``--swap A B``). The agreement is then measured against the
swapped teacher in 500-event blocks from the swap. PASS when every block that starts 1,500 events
or more after the swap is at or above TARGET - 0.01.

Prints the figures; writes bench/out/contract_guarantees.json.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cascade.config import load_config
from cascade.evaluation.data import LabelledEvent, labels_of, read_stream
from cascade.messages import Event
from cascade.routing.cascade import Cascade
from cascade.tiers.llm import RecordedAnswers

STREAMS = [("isear", "gpt-3.5-turbo-1106"), ("hatespeech", "llama-2-70b-chat")]
CHECKPOINT, DRIFT_AT, DRIFT_BLOCK, RECOVERY = 500, 4000, 500, 1500
COVERAGE_TARGET, BLOCK_SLACK = 0.95, 0.01


def run_stream(
    dataset: str, llm: str, rows: list[LabelledEvent], target: float, salt: str,
    on_checkpoint: Callable[[int, float, float], None] | None = None,
) -> tuple[list[bool], list[bool]]:
    """The stream through the in-process cascade under ``--min-agreement target``; per event, whether
    the delivered decision agrees with the recorded (possibly altered) LLM answer, and whether a cheap
    tier delivered it. ``on_checkpoint`` gets (events, true agreement so far, the contract's
    whole-stream lower bound) every 500 events."""
    config = load_config(None, task={"name": dataset, "labels": sorted(labels_of(rows))}, llm={"name": llm},
                         contract={"min_agreement": target, "audit_salt": salt})
    agree: list[bool] = []
    cheap: list[bool] = []
    with Cascade(config) as cascade:
        tiers = {stage.tier.name for stage in cascade.stages}
        recorded = cascade.llm
        assert isinstance(recorded, RecordedAnswers), "the benchmark replays recorded answers"
        assert cascade.contract is not None
        for row in rows:
            decision = cascade.step([row.event]).decisions[0]
            teacher = cascade.task.map_answer(recorded.recorded(row.event)[1])
            agree.append(decision.label is not None and decision.label == teacher)
            cheap.append(decision.tier in tiers)
            if on_checkpoint is not None and len(agree) % CHECKPOINT == 0:
                on_checkpoint(len(agree), sum(agree) / len(agree), cascade.contract.estimate().agreement_lower_bound)
    return agree, cheap


def coverage_run(data_dir: str, dataset: str, llm: str, seed: int, target: float) -> dict[str, Any]:
    rows = read_stream(Path(data_dir) / f"{dataset}.jsonl.gz", shuffle_seed=seed)
    checks: list[tuple[int, float, float]] = []
    agree, cheap = run_stream(dataset, llm, rows, target, f"coverage-{seed}", lambda n, t, b: checks.append((n, t, b)))
    return {"dataset": dataset, "seed": seed, "target": target, "agreement": sum(agree) / len(agree),
            "llm_answered": 1 - sum(cheap) / len(cheap),
            "checkpoints": [{"events": n, "true": t, "bound": b} for n, t, b in checks]}


def swapped(rows: list[LabelledEvent], llm: str, a: str, b: str, start: int) -> list[LabelledEvent]:
    """The stream with the recorded answers ``a`` and ``b`` exchanged from event ``start`` on."""
    swap = {a: b, b: a}
    out = rows[:start]
    for r in rows[start:]:
        answers = dict(r.event.payload.get("llm", {}))
        raw = answers.get(llm)
        if isinstance(raw, str) and raw.strip().lower() in swap:
            answers[llm] = swap[raw.strip().lower()]
        event = Event(id=r.event.id, text=r.event.text, payload={**r.event.payload, "llm": answers})
        out.append(LabelledEvent(event, r.gold))
    return out


def drift_run(data_dir: str, target: float, a: str, b: str) -> dict[str, Any]:
    dataset, llm = STREAMS[0]
    original = read_stream(Path(data_dir) / f"{dataset}.jsonl.gz", shuffle_seed=0)
    rows = swapped(original, llm, a, b, DRIFT_AT)
    agree, cheap = run_stream(dataset, llm, rows, target, "drift")
    blocks = [(s, sum(agree[s : s + DRIFT_BLOCK]) / DRIFT_BLOCK, 1 - sum(cheap[s : s + DRIFT_BLOCK]) / DRIFT_BLOCK)
              for s in range(DRIFT_AT - 2 * DRIFT_BLOCK, len(agree) - DRIFT_BLOCK + 1, DRIFT_BLOCK)]
    late = [v for s, v, _ in blocks if s >= DRIFT_AT + RECOVERY]
    changed = sum(r.event.payload["llm"].get(llm) != o.event.payload["llm"].get(llm) for r, o in zip(rows, original))
    return {"swap": [a, b], "answers_swapped": changed, "target": target, "blocks": blocks,
            "pass": bool(late) and min(late) >= target - BLOCK_SLACK}


def report_coverage(runs: list[dict[str, Any]]) -> bool:
    pairs = [(c["true"], c["bound"]) for r in runs for c in r["checkpoints"]]
    held = sum(bound <= true for true, bound in pairs)
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        mine = [r for r in runs if r["dataset"] == dataset]
        cps = [c for r in mine for c in r["checkpoints"]]
        ok = sum(c["bound"] <= c["true"] for c in cps)
        gap = sum(c["true"] - c["bound"] for c in cps) / max(len(cps), 1)
        print(f"coverage {dataset}: {len(mine)} seeds, bound <= true at {ok}/{len(cps)} checkpoints "
              f"({ok / max(len(cps), 1):.3f}), mean true - bound {gap:.3f}, whole-stream agreement "
              f"{min(r['agreement'] for r in mine):.4f}..{max(r['agreement'] for r in mine):.4f}, "
              f"{sum(r['agreement'] < r['target'] for r in mine)} runs below the target; LLM-answered share "
              f"mean {sum(r['llm_answered'] for r in mine) / len(mine):.3f}")
    share = held / max(len(pairs), 1)
    passed = share >= COVERAGE_TARGET
    print(f"coverage overall: {held}/{len(pairs)} = {share:.3f} (target >= {COVERAGE_TARGET}) "
          f"{'PASS' if passed else 'MISS'}")
    return passed


def report_drift(run: dict[str, Any]) -> bool:
    a, b = run["swap"]
    print(f"drift: isear shuffled(0), answers {a} <-> {b} swapped from event {DRIFT_AT} "
          f"({run['answers_swapped']} answers changed), target {run['target']}")
    for start, value, llm_share in run["blocks"]:
        mark = "" if start < DRIFT_AT else f"  (+{start - DRIFT_AT})"
        print(f"  events {start:>5}-{start + DRIFT_BLOCK - 1:<5} agreement {value:.4f}  LLM share {llm_share:.3f}{mark}")
    print(f"drift: blocks from +{RECOVERY} at or above {run['target'] - BLOCK_SLACK:.2f}: "
          f"{'PASS' if run['pass'] else 'MISS'}")
    return bool(run["pass"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="/work/shared/data")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--swap", nargs=2, default=["joy", "sadness"], metavar=("A", "B"))
    ap.add_argument("--only", choices=["coverage", "drift"])
    ap.add_argument("--stream", choices=[d for d, _ in STREAMS], help="coverage on this stream only")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "contract_guarantees.json")
    args = ap.parse_args()
    if not Path(args.data_dir, "isear.jsonl.gz").exists():
        print(f"skipped: no recorded streams in {args.data_dir}")
        return 0
    out: dict[str, Any] = {}
    ok = True
    with ProcessPoolExecutor(args.jobs) as pool:
        drift = pool.submit(drift_run, args.data_dir, args.target, *args.swap) if args.only != "coverage" else None
        if args.only != "drift":
            streams = [(d, llm) for d, llm in STREAMS if args.stream in (None, d)]
            jobs = [(args.data_dir, d, llm, s, args.target) for d, llm in streams for s in range(args.seeds)]
            out["coverage"] = list(pool.map(coverage_run, *zip(*jobs, strict=True)))
            ok &= report_coverage(out["coverage"])
        if drift is not None:
            out["drift"] = drift.result()
            ok &= report_drift(out["drift"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
