"""The quality contract against the oracle: a fixed mu swept in the same run.

    python bench/contract.py [--data-dir /work/shared/data] [--order shuffled|file|both] [--jobs 2]

On isear with GPT-3.5 answers and hatespeech with Llama-2 answers (shuffled with seed 0 and/or in
file order), every target is one `cascade simulate` run with the contract
(--min-agreement 0.90, 0.95, 0.98; --max-llm-fraction 0.2, 0.4, 0.6) and every mu of the sweep one
run with that fixed price (no audits). The oracle is the best fixed mu in hindsight: its
(LLM-call fraction, agreement) frontier, interpolated linearly, with mu = 0 (the LLM alone) at (1, 1).

Per target: whole-stream agreement with the LLM, the lowest agreement over the complete
2,000-event blocks after the first (the first holds the warm-up), LLM calls (answers and audits).

* min_agreement A: PASS when agreement >= A, every later block >= A - 0.01 (a block of 2,000 has
  a standard error of about 0.005 at 0.95) and the LLM calls are at most 1.15 x the oracle's at the
  agreement reached.
* max_llm_fraction F: PASS when the fraction is <= F + 0.01 and the agreement is at least the
  oracle's at the fraction reached, minus 0.01.

Prints the table; writes bench/out/contract.json.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cascade.config import load_config
from cascade.evaluation.data import labels_of, read_stream
from cascade.evaluation.simulate import simulate_scored

STREAMS = [("isear", "gpt-3.5-turbo-1106"), ("hatespeech", "llama-2-70b-chat")]
MIN_AGREEMENT = [0.90, 0.95, 0.98]
MAX_LLM_FRACTION = [0.2, 0.4, 0.6]
MUS = [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5]
BLOCK = 2000
RATIO_TARGET, FRACTION_SLACK, AGREEMENT_SLACK = 1.15, 0.01, 0.01


def run_point(data_dir: str, dataset: str, llm: str, shuffle: int | None, setting: dict[str, float]) -> dict[str, Any]:
    """One simulate run; ``setting`` is {"mu": x}, {"min_agreement": a} or {"max_llm_fraction": f}."""
    rows = read_stream(Path(data_dir) / f"{dataset}.jsonl.gz", shuffle_seed=shuffle)
    pricing: dict[str, Any] = (
        {"deferral": {"mu": setting["mu"]}} if "mu" in setting
        else {"contract": {"min_agreement": setting.get("min_agreement"),
                           "max_llm_fraction": setting.get("max_llm_fraction")}}
    )
    config = load_config(None, task={"name": dataset, "labels": sorted(labels_of(rows))}, llm={"name": llm}, **pricing)
    report, scorer = simulate_scored(config, rows, progress=False)
    agree = [p is not None and p == a for p, a in zip(scorer.pred, scorer.llm_pred, strict=True)]
    blocks = [sum(agree[i : i + BLOCK]) / BLOCK for i in range(BLOCK, len(agree) - BLOCK + 1, BLOCK)]
    c = report.contract
    return {
        "dataset": dataset, "llm": llm, "order": "file" if shuffle is None else f"shuffled({shuffle})",
        "setting": setting, "events": report.events, "llm_call_fraction": report.llm_call_fraction,
        "audit_calls": report.audit_calls, "agreement": report.agreement_with_llm,
        "min_block_agreement": min(blocks) if blocks else None, "accuracy": report.accuracy,
        "agreement_lower_bound": report.agreement_lower_bound,
        "window_agreement_lower_bound": report.window_agreement_lower_bound,
        "budget_binding_updates": c.budget_binding_updates if c else 0, "seconds": report.seconds,
    }


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(fraction, agreement) points of the fixed-mu sweep, plus the LLM alone, as a Pareto frontier:
    sorted by fraction, keeping only points that agree more than every cheaper one."""
    out: list[tuple[float, float]] = []
    for f, a in sorted([*points, (1.0, 1.0)]):
        if not out or a > out[-1][1]:
            out.append((f, a))
    return out


def fraction_for(front: list[tuple[float, float]], agreement: float) -> float | None:
    """The oracle's LLM-call fraction to reach ``agreement``: interpolated between frontier points; the
    cheapest point's when even that one agrees more (the sweep has nothing cheaper)."""
    for (f0, a0), (f1, a1) in zip(front, front[1:], strict=False):
        if a0 >= agreement:
            return f0
        if a1 >= agreement:
            return f0 + (f1 - f0) * (agreement - a0) / (a1 - a0)
    return front[-1][0] if front[-1][1] >= agreement else None  # only above 1


def agreement_at(front: list[tuple[float, float]], fraction: float) -> float | None:
    """The oracle's agreement at ``fraction`` LLM calls (None: cheaper than any fixed mu ran)."""
    if fraction < front[0][0]:
        return None
    for (f0, a0), (f1, a1) in zip(front, front[1:], strict=False):
        if f0 <= fraction <= f1:
            return a0 + (a1 - a0) * (fraction - f0) / (f1 - f0) if f1 > f0 else a1
    return front[-1][1]


def judge(row: dict[str, Any], front: list[tuple[float, float]]) -> dict[str, Any]:
    s, frac, agr = row["setting"], row["llm_call_fraction"], row["agreement"]
    if "min_agreement" in s:
        target = s["min_agreement"]
        oracle = fraction_for(front, agr)
        ratio = frac / oracle if oracle else None
        block_ok = row["min_block_agreement"] is None or row["min_block_agreement"] >= target - AGREEMENT_SLACK
        ok = agr >= target and block_ok and ratio is not None and ratio <= RATIO_TARGET
        return {"oracle_fraction": oracle, "ratio": ratio, "pass": ok}
    cap = s["max_llm_fraction"]
    oracle_agreement = agreement_at(front, frac)
    ok = frac <= cap + FRACTION_SLACK and (oracle_agreement is None or agr >= oracle_agreement - AGREEMENT_SLACK)
    return {"oracle_agreement": oracle_agreement, "pass": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="/work/shared/data")
    ap.add_argument("--order", choices=["shuffled", "file", "both"], default="shuffled",
                    help="streams shuffled with seed 0, in file order, or both")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "contract.json")
    args = ap.parse_args()
    orders: list[int | None] = {"shuffled": [0], "file": [None], "both": [0, None]}[args.order]
    settings = ([{"min_agreement": a} for a in MIN_AGREEMENT] + [{"max_llm_fraction": f} for f in MAX_LLM_FRACTION]
                + [{"mu": m} for m in MUS])
    jobs = [(args.data_dir, d, llm, o, s) for d, llm in STREAMS for o in orders for s in settings]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(run_point, *zip(*jobs, strict=True)))
    results = []
    for d, llm in STREAMS:
        for o in orders:
            order = "file" if o is None else f"shuffled({o})"
            mine = [r for r in rows if r["dataset"] == d and r["order"] == order]
            front = frontier([(r["llm_call_fraction"], r["agreement"]) for r in mine if "mu" in r["setting"]])
            print(f"\n{d} / {llm}, {order}: fixed-mu frontier (LLM calls, agreement) "
                  + " ".join(f"({f:.3f}, {a:.4f})" for f, a in front))
            print(f"{'target':<22} {'agreement':>9} {'min block':>9} {'LLM calls':>9} {'audits':>6} "
                  f"{'bound':>6} {'oracle':>14} {'result':>6}")
            for r in mine:
                if "mu" in r["setting"]:
                    continue
                r.update(judge(r, front))
                name, value = next(iter(r["setting"].items()))
                block = "-" if r["min_block_agreement"] is None else f"{r['min_block_agreement']:.4f}"
                if "ratio" in r:
                    oracle = "n/a" if r["ratio"] is None else f"{r['oracle_fraction']:.3f} x{r['ratio']:.2f}"
                else:
                    oracle = "n/a" if r["oracle_agreement"] is None else f"agr {r['oracle_agreement']:.4f}"
                print(f"{name + ' ' + str(value):<22} {r['agreement']:>9.4f} {block:>9} {r['llm_call_fraction']:>9.3f} "
                      f"{r['audit_calls']:>6} {r['agreement_lower_bound']:>6.3f} {oracle:>14} "
                      f"{'PASS' if r['pass'] else 'MISS':>6}")
            results.extend(mine)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
