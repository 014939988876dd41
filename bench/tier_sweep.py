"""First cheap tier ``logistic`` (baseline) against ``nblr``: the cascade's quality and speed.

    python bench/tier_sweep.py [--data-dir ../shared/data] [--jobs 2] [--file-order] [--onnx] [--onnx-limit 2000]

Streams, shuffled with seed 0 (``--file-order``: in file order): isear with GPT-3.5's answers, and hatespeech with Llama-2's and
miss costs {"hate": 3} (as bench/cascade_sweep.py). Each (tier, mu) is one run of
`cascade.evaluation.simulate` (what `cascade simulate` runs) with that tier before the LLM.
Reported: accuracy against gold, agreement with the LLM, hate recall, LLM share and events/s,
and that events/s over the logistic run's at the same mu in the same sweep. The sweep's runs
share the cores (``--jobs``), so the throughput target is measured apart: ISEAR at mu 0.3, one
run at a time, logistic and nblr alternating, best of ``--repeats``.

The issue's targets, PASS/MISS per first tier:
  * ISEAR/GPT-3.5, LLM share <= 60%: accuracy >= 0.69 (the LLM alone: 0.7035)
  * ISEAR/GPT-3.5, LLM share <= 45%: accuracy >= 0.675
  * hatespeech/Llama-2, LLM share <= 40%: agreement >= 0.93 and hate recall >= 0.76 (one run)
  * hatespeech/Llama-2, LLM share <= 30%: hate recall >= 0.76
  * ISEAR: `cascade simulate` with the default tier >= 3x the events/s of the river-based logistic
    tier it had before issue 18: measured against that checkout by bench/simulate_speed.py; here
    nblr's events/s is only compared with today's (numpy) logistic tier.

"Same LLM share" (after the targets): each nblr run against the logistic curve interpolated
linearly at nblr's LLM share (accuracy, and hate recall on hatespeech): the evidence for which
first tier is the default.

``--onnx`` adds, on the first ``--onnx-limit`` ISEAR events (0: all, next to the main sweep), ensemble(nblr, onnx) → LLM and
nblr → onnx → LLM next to logistic → LLM and nblr → LLM on the same events. The MiniLM
embeddings come from bench/out/emb-isear-minilm-l6-int8.npz (bench/onnx_tiers.py makes it), so
their events/s leave out the encoder (~70 texts/s/core). Writes bench/out/tier_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cascade.config import load_config
from cascade.evaluation.data import labels_of, read_stream
from cascade.evaluation.simulate import simulate

GPT, LLAMA = "gpt-3.5-turbo-1106", "llama-2-70b-chat"
OUT = Path(__file__).parent / "out"
STREAMS = {"isear": (GPT, {}), "hatespeech": (LLAMA, {"hate": 3.0})}
MUS = {"isear": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], "hatespeech": [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]}
ONNX_MUS = [0.1, 0.2, 0.3, 0.4]
ENCODER = "minilm-l6-int8"
COSTS = {"logistic": 1.0, "nblr": 1.0, "onnx": 5.0, "ensemble": 6.0}


def tiers_of(setup: str) -> list[dict[str, Any]]:
    """The cheap tiers of a named setup, cheapest first."""
    onnx = {"name": "onnx", "kind": "onnx", "cost": COSTS["onnx"], "encoder": ENCODER,
            "embedding_cache": str(OUT / f"emb-isear-{ENCODER}.npz")}
    if setup in ("logistic", "nblr"):
        return [{"name": setup, "kind": setup, "cost": COSTS[setup]}]
    if setup == "ensemble(nblr,onnx)":
        return [{"name": "ens", "kind": "ensemble", "cost": COSTS["ensemble"],
                 "members": [{"name": "nblr", "kind": "nblr"}, {**onnx, "name": "minilm"}]}]
    if setup == "nblr>onnx":
        return [{"name": "nblr", "kind": "nblr", "cost": COSTS["nblr"]}, onnx]
    raise ValueError(setup)


def run_point(
    data_dir: str, dataset: str, setup: str, mu: float, limit: int | None = None, shuffle: int | None = 0,
) -> dict[str, Any]:
    llm, miss = STREAMS[dataset]
    rows = read_stream(Path(data_dir) / f"{dataset}.jsonl.gz", shuffle_seed=shuffle, limit=limit)
    config = load_config(
        None,
        task={"name": dataset, "labels": sorted(labels_of(rows)), "miss_costs": miss},
        llm={"name": llm, "cost": 100.0},
        deferral={"mu": mu},
        tiers=tiers_of(setup),
    )
    r = simulate(config, rows, progress=False)
    hate = r.per_class.get("hate")
    return {
        "dataset": dataset, "llm": llm, "setup": setup, "mu": mu, "limit": limit, "miss_costs": miss,
        "order": "file" if shuffle is None else f"shuffled({shuffle})",
        "llm_share": r.llm_call_fraction, "accuracy": r.accuracy, "agreement": r.agreement_with_llm,
        "llm_accuracy": r.llm_accuracy, "cheap_alone_accuracy": r.cheap_tier_alone_accuracy,
        "hate_recall": hate.recall if hate else None, "events_per_second": r.events_per_second,
    }


def table(points: list[dict[str, Any]], baseline: str = "logistic") -> None:
    base = {(p["dataset"], p["mu"], p["limit"]): p["events_per_second"] for p in points if p["setup"] == baseline}
    print(f"{'dataset':<11}{'limit':>6} {'first tier':<21}{'mu':>5}{'LLM%':>7}{'acc':>8}{'agree':>7}{'hateR':>7}"
          f"{'ev/s':>8}{'x base':>8}{'cheap-alone':>12}")
    for p in points:
        hate = f"{p['hate_recall']:.3f}" if p["hate_recall"] is not None else "-"
        b = base.get((p["dataset"], p["mu"], p["limit"]))
        ratio = f"{p['events_per_second'] / b:.2f}" if b else "-"
        print(f"{p['dataset']:<11}{p['limit'] or '-':>6} {p['setup']:<21}{p['mu']:>5}{p['llm_share']:>7.1%}"
              f"{p['accuracy']:>8.4f}{p['agreement']:>7.3f}{hate:>7}{p['events_per_second']:>8.0f}{ratio:>8}"
              f"{p['cheap_alone_accuracy']:>12.4f}")


def best(points: list[dict[str, Any]], dataset: str, setup: str, share: float, ok: Any, key: Any) -> dict[str, Any] | None:
    """The run within ``share`` LLM calls that meets ``ok``, else the best by ``key``."""
    runs = [p for p in points if p["dataset"] == dataset and p["setup"] == setup and p["llm_share"] <= share]
    hits = [p for p in runs if ok(p)]
    return max(hits or runs, key=key, default=None)


def targets(points: list[dict[str, Any]], speed: dict[str, float]) -> list[str]:
    lines = []
    for setup in dict.fromkeys(p["setup"] for p in points):
        checks = [
            ("isear", 0.60, "ISEAR <=60% LLM: accuracy >= 0.69", lambda p: p["accuracy"] >= 0.69, lambda p: p["accuracy"]),
            ("isear", 0.45, "ISEAR <=45% LLM: accuracy >= 0.675", lambda p: p["accuracy"] >= 0.675, lambda p: p["accuracy"]),
            ("hatespeech", 0.40, "hatespeech <=40% LLM: agreement >= 0.93 and hate recall >= 0.76",
             lambda p: p["agreement"] >= 0.93 and p["hate_recall"] >= 0.76,
             lambda p: (min(p["agreement"] / 0.93, p["hate_recall"] / 0.76))),
            ("hatespeech", 0.30, "hatespeech <=30% LLM: hate recall >= 0.76", lambda p: p["hate_recall"] >= 0.76,
             lambda p: p["hate_recall"]),
        ]
        for dataset, share, what, ok, key in checks:
            if not any(p["dataset"] == dataset and p["setup"] == setup for p in points):
                continue  # the ONNX setups run on ISEAR only
            p = best(points, dataset, setup, share, ok, key)
            if p is None:
                lines.append(f"  MISS  {setup:<9} {what}: no run within {share:.0%} LLM calls")
                continue
            hate = f", hate recall {p['hate_recall']:.3f}" if p["hate_recall"] is not None else ""
            lines.append(f"  {'PASS' if ok(p) else 'MISS'}  {setup:<9} {what}: mu {p['mu']} -> {p['llm_share']:.1%} LLM, "
                         f"accuracy {p['accuracy']:.4f}, agreement {p['agreement']:.3f}{hate}")
    ratio = speed["nblr"] / speed["logistic"]
    lines.append(f"  info  nblr      ISEAR events/s against the (numpy) logistic tier: "
                 f"{speed['nblr']:,.0f} vs {speed['logistic']:,.0f} ev/s = {ratio:.2f}x")
    return lines


def interpolate(curve: list[tuple[float, float]], x: float) -> float | None:
    """The piecewise-linear curve (x ascending) at x; None outside its range."""
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def same_share(points: list[dict[str, Any]], setup: str = "nblr", baseline: str = "logistic") -> list[str]:
    """``setup``'s runs against ``baseline``'s curve at the same LLM share (see the docstring)."""
    lines = [f"{'dataset':<11}{'mu':>5}{'LLM%':>7}{'acc':>8}{'base acc':>9}{'diff':>8}{'hateR':>7}{'base':>7}{'diff':>8}"]
    for p in (p for p in points if p["setup"] == setup):
        runs = sorted((q for q in points if q["setup"] == baseline and q["dataset"] == p["dataset"]),
                      key=lambda q: q["llm_share"])
        acc = interpolate([(q["llm_share"], q["accuracy"]) for q in runs], p["llm_share"])
        if acc is None:
            lines.append(f"{p['dataset']:<11}{p['mu']:>5}{p['llm_share']:>7.1%}  outside the {baseline} curve")
            continue
        row = f"{p['dataset']:<11}{p['mu']:>5}{p['llm_share']:>7.1%}{p['accuracy']:>8.4f}{acc:>9.4f}{p['accuracy'] - acc:>+8.4f}"
        if p["hate_recall"] is not None:
            hate = interpolate([(q["llm_share"], q["hate_recall"]) for q in runs], p["llm_share"])
            if hate is not None:
                row += f"{p['hate_recall']:>7.3f}{hate:>7.3f}{p['hate_recall'] - hate:>+8.3f}"
        lines.append(row)
    return lines


def throughput(data_dir: str, repeats: int) -> dict[str, float]:
    """ISEAR at mu 0.3, one run at a time, the two tiers alternating: best events/s of each."""
    out: dict[str, float] = {}
    for _ in range(repeats):
        for setup in ("logistic", "nblr"):
            eps = run_point(data_dir, "isear", setup, 0.3)["events_per_second"]
            out[setup] = max(out.get(setup, 0.0), eps)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--file-order", action="store_true", help="the streams in file order, not shuffled")
    ap.add_argument("--repeats", type=int, default=3, help="throughput runs of each tier")
    ap.add_argument("--onnx", action="store_true", help="also the ONNX setups on ISEAR (--onnx-limit events)")
    ap.add_argument("--onnx-limit", type=int, default=2000, help="0: the whole stream (only the ONNX setups "
                    "then: logistic and nblr are in the main sweep)")
    ap.add_argument("--onnx-mus", type=float, nargs="+", default=ONNX_MUS)
    ap.add_argument("--out", default=str(OUT / "tier_sweep.json"))
    args = ap.parse_args()
    data_dir = Path(args.data_dir)
    if not all((data_dir / f"{d}.jsonl.gz").exists() for d in STREAMS):
        print(f"SKIP: data files not found in {data_dir} (see ../shared/data/README.md)", file=sys.stderr)
        return 0
    dd = str(data_dir)
    shuffle = None if args.file_order else 0
    jobs = [(dd, d, s, mu, None, shuffle) for d in STREAMS for s in ("logistic", "nblr") for mu in MUS[d]]
    if args.onnx:
        if not (OUT / f"emb-isear-{ENCODER}.npz").exists():
            print("no embedding cache: run bench/onnx_tiers.py first (it writes bench/out/emb-*.npz)", file=sys.stderr)
            return 1
        limit = args.onnx_limit or None
        setups = ("ensemble(nblr,onnx)", "nblr>onnx") if limit is None else ("logistic", "nblr", "ensemble(nblr,onnx)", "nblr>onnx")
        jobs += [(dd, "isear", s, mu, limit, shuffle) for s in setups for mu in args.onnx_mus]
    print(f"{len(jobs)} runs on {args.jobs} processes ...", file=sys.stderr)
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        points = list(pool.map(run_point, *zip(*jobs)))
    print(f"sweep took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    speed = throughput(dd, args.repeats)

    full = [p for p in points if p["limit"] is None]
    print(f"\nFull streams, {'file order' if shuffle is None else 'shuffled (seed 0)'}; ev/s of runs sharing the cores, 'x base' against logistic at the same mu")
    table(full)
    limited = [p for p in points if p["limit"] is not None]
    if limited:
        print(f"\nISEAR/GPT-3.5, first {args.onnx_limit} events (onnx embeddings from the cache: ev/s without the encoder)")
        table(limited)
    print(f"\nthroughput, ISEAR mu 0.3, one run at a time, best of {args.repeats}: "
          + ", ".join(f"{k} {v:,.0f} ev/s" for k, v in speed.items()))
    print("\ntargets (full streams):")
    print("\n".join(targets(full, speed)))
    print(f"\nsame LLM share: nblr against the logistic curve ({'file order' if shuffle is None else 'shuffled'})")
    print("\n".join(same_share(full)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"points": points, "throughput": speed}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
