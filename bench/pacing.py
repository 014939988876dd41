"""Budget pacing under `cascade run`: a calls-per-minute budget below the demand, paced and not.

    PYTHONPATH=. python bench/pacing.py [--data ../shared/data/isear.jsonl.gz] [--rate 12]
        [--minutes 4] [--budget-share 0.5]

The whole pipeline (tier, LLM and learner workers as processes) on a private Tansu and the local
Redis, fed ISEAR (shuffled, seed 0) at a fixed rate under the default contract (min_agreement
0.95, which asks the LLM for most events while the tier is young), with ``budget.calls_per_minute``
at ``--budget-share`` of the LLM demand. The demand is estimated as rate x 60 x the LLM share of a
`cascade simulate` run of the same events (in-process, same run); the measured demand per minute
(calls made + calls refused) is printed too. Two runs, one after the other: ``budget.pace: true``
(the default) and, as the baseline, ``pace: false`` (a plain cap).

While a run goes, the bench reads the window's spend from Redis twice a second. Per complete
minute window: the spend (never above the cap, by the Lua script), the share of the cap left
unused, and how the spend is spread: its share spent by 10, 15, 30 and 45 seconds into the
minute (an even spread: 0.17, 0.25, 0.5, 0.75). Targets: spend <= cap, under 5% unused, and the
spend spread over the minute, not spent in its first seconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from cascade.config import CascadeConfig, load_config
from cascade.evaluation.data import labels_of, read_stream
from cascade.evaluation.simulate import simulate
from cascade.state import make_state
from devtools.services import ensure_redis, free_port, start_tansu
from workers.run import run_pipeline

LLM = "gpt-3.5-turbo-1106"
MARKS = (10, 15, 30, 45)


def pipeline_config(bootstrap: str, redis_url: str, labels: list[str], calls_per_minute: int, pace: bool) -> CascadeConfig:
    prefix = f"pace{uuid.uuid4().hex[:6]}."
    return load_config(None, task={"name": "isear", "labels": labels}, llm={"name": LLM, "backend": "recorded"},
                       kafka={"bootstrap_servers": bootstrap, "topic_prefix": prefix, "partitions": 2},
                       redis={"url": redis_url, "key_prefix": prefix}, state={"backend": "redis"},
                       budget={"calls_per_minute": calls_per_minute, "pace": pace})


def watch_spend(config: CascadeConfig, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    """(time, spent in the current minute window) twice a second, from the budget script itself."""
    state = make_state(config)
    limit = float(config.budget.calls_per_minute or 0)
    while not stop.wait(0.5):
        left = state.budget_remaining().get("calls_per_minute")
        if left is not None:
            out.append((time.time(), limit - float(left)))
    state.close()


def minutes(samples: list[tuple[float, float]], cap: float) -> list[dict[str, Any]]:
    """Per complete minute window: its spend and the share of the cap spent by each mark."""
    by_window: dict[int, list[tuple[float, float]]] = {}
    for t, spent in samples:
        by_window.setdefault(int(t // 60), []).append((t % 60, spent))
    rows = []
    for wid in sorted(by_window)[1:-1]:  # the first and last windows are partial
        points = by_window[wid]
        if points[0][0] > 2 or points[-1][0] < 58:
            continue  # a gap in the samples
        spent = max(s for _, s in points)
        at = {m: max((s for sec, s in points if sec <= m), default=0.0) / cap for m in MARKS}
        rows.append({"window": wid, "spent": spent, "unused": 1 - spent / cap, "over_cap": spent > cap, "by": at})
    return rows


def run(args: argparse.Namespace, bootstrap: str, redis_url: str, calls: int, pace: bool) -> dict[str, Any]:
    rows = read_stream(args.data, shuffle_seed=0, limit=int(args.rate * 60 * (args.minutes + 0.5)))
    config = pipeline_config(bootstrap, redis_url, sorted(labels_of(rows)), calls, pace)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch_spend, args=(config, stop, samples), daemon=True)
    watcher.start()
    with tempfile.TemporaryDirectory() as run_dir:
        report, decisions = run_pipeline(config, rows, Path(run_dir), free_port(), timeout_s=args.minutes * 60 + 300,
                                         progress=False, rate=args.rate)
    stop.set()
    watcher.join()
    refused: dict[int, int] = {}
    for ds in decisions.values():
        for d in ds:
            if d.reason == "budget_exhausted":
                refused[int(d.ts // 60)] = refused.get(int(d.ts // 60), 0) + 1
    table = minutes(samples, float(calls))
    for row in table:
        row["demand"] = row["spent"] + refused.get(row["window"], 0)
    return {"pace": pace, "events": len(rows), "decided": len(decisions), "minutes": table,
            "llm_call_fraction": report.llm_call_fraction if report else None}


def show(result: dict[str, Any], cap: int) -> None:
    name = "paced" if result["pace"] else "unpaced (baseline)"
    print(f"\n{name}: {result['decided']}/{result['events']} decided, LLM calls {result['llm_call_fraction']:.3f} per event")
    print(f"{'minute':>6} {'spent':>6} {'cap':>5} {'demand':>6} {'unused':>7} " + " ".join(f"{'by ' + str(m) + 's':>7}" for m in MARKS))
    for i, r in enumerate(result["minutes"]):
        print(f"{i + 1:>6} {r['spent']:>6.0f} {cap:>5} {r['demand']:>6.0f} {r['unused']:>7.3f} "
              + " ".join(f"{r['by'][m]:>7.2f}" for m in MARKS))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "isear.jsonl.gz")
    ap.add_argument("--rate", type=float, default=12.0, help="events per second")
    ap.add_argument("--minutes", type=float, default=4.0, help="of traffic per run")
    ap.add_argument("--budget-share", type=float, default=0.5, help="the budget as a share of the LLM demand")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args()
    if not args.data.exists():
        print(f"skipped: {args.data} is absent")
        return 0
    rows = read_stream(args.data, shuffle_seed=0, limit=int(args.rate * 60 * (args.minutes + 0.5)))
    share = simulate(load_config(None, task={"name": "isear", "labels": sorted(labels_of(rows))}, llm={"name": LLM}),
                     rows, progress=False).llm_call_fraction
    calls = max(1, round(args.budget_share * args.rate * 60 * share))
    print(f"demand estimate: {args.rate} events/s x 60 x {share:.3f} LLM share (simulate) = "
          f"{args.rate * 60 * share:.0f} calls/min; budget.calls_per_minute = {calls}")
    broker = start_tansu(None)
    redis_handle = ensure_redis(args.redis)
    try:
        results = [run(args, broker.bootstrap_servers, args.redis, calls, pace) for pace in (True, False)]
    finally:
        broker.stop()
        if redis_handle.owned:
            redis_handle.stop()
    ok = True
    for res in results:
        show(res, calls)
        table = res["minutes"]
        if not table:
            print("no complete minute measured")
            ok = False
            continue
        unused = statistics.mean(r["unused"] for r in table)
        early = statistics.mean(r["by"][10] for r in table)
        over = any(r["over_cap"] for r in table)
        print(f"mean unused {unused:.3f}, mean share spent in the first 10 s {early:.2f} (even: 0.17), "
              f"over the cap: {'yes' if over else 'never'}")
        if res["pace"]:
            ok = not over and unused < 0.05 and early < 0.3
            print(f"paced: {'PASS' if ok else 'MISS'} (spend <= cap, < 5% unused, first 10 s < 0.3 of the cap)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
