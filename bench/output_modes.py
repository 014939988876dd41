"""Per-record cost of the decisions topic's records in each output mode (workers/output.py), and
what the enriched mode adds to a deferral (the Origin: key and headers) on its way to the LLM.

    python bench/output_modes.py [--data-dir ../shared/data] [--events 5000] [--repeat 15]

Over the first ``--events`` ISEAR events (their JSON as the user's event: id, text, recorded LLM
answers), each with a key and two headers (a trace id and a source). "decision" builds the
Decision record, "enriched" the event with the decision under ``cascade``; both through
``output_record``, as the workers do. The deferral rows serialize (tier worker) and parse (LLM
worker) a ``Deferred`` with and without an Origin. Each of ``--repeat`` rounds runs every step
once over all events, interleaved; times are microseconds per record (best round and median), the
ratio is against the decision mode (or the deferral without origin) within each round, its median.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from cascade.config import OutputConfig
from cascade.evaluation.data import read_stream
from cascade.messages import Decision, Deferred, Origin, TierOutput
from workers.output import output_record, read_decision


def per_record_us(fn: Callable[[], object], n: int) -> float:
    # Without the cyclic collector, as in a worker (gc.freeze and a 20,000 threshold, see
    # workers/loop.py): otherwise whichever step happens to trigger a full collection pays for all.
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return 1e6 * (time.perf_counter() - start) / n
    finally:
        gc.enable()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    rows = read_stream(args.data_dir / "isear.jsonl.gz")[: args.events]
    n = len(rows)
    out = TierOutput(tier="logistic", version=1200, probs=[1 / 7] * 7, policy_features=[0.1] * 14, p_agree=0.6)
    plain, with_origin, decisions = [], [], []
    for r in rows:
        e = r.event
        origin = Origin(key=f"order-{e.id}".encode(), headers=[("trace-id", f"{e.id:0>32}".encode()), ("source", b"web")])
        plain.append(Deferred(event=e, outputs=[out], cost=1.0, first_seen=0.0))
        with_origin.append(Deferred(event=e, outputs=[out], cost=1.0, first_seen=0.0, origin=origin))
        decisions.append(Decision(event_id=e.id, label="joy", tier="logistic", confidence=0.83, reason="tier",
                                  model_versions={"logistic": 1200}, cost=1.0, ts=1765000000.0))
    modes = {"decision": OutputConfig(), "enriched": OutputConfig(mode="enriched")}
    built = {name: [output_record(m, "decisions", d, item) for d, item in zip(decisions, with_origin)]
             for name, m in modes.items()}
    dumped = {name: [d.model_dump_json() for d in items] for name, items in (("without origin", plain),
                                                                             ("with origin", with_origin))}
    steps: dict[str, Callable[[], object]] = {}
    for name, m in modes.items():
        steps[f"build {name}"] = lambda m=m: [output_record(m, "decisions", d, item) for d, item in zip(decisions, with_origin)]
        steps[f"read {name}"] = lambda m=m, name=name: [read_decision(r.value, m) for r in built[name]]
    for name, items in (("without origin", plain), ("with origin", with_origin)):
        steps[f"deferral dump {name}"] = lambda items=items: [d.model_dump_json() for d in items]
        steps[f"deferral parse {name}"] = lambda name=name: [Deferred.model_validate_json(v) for v in dumped[name]]
    sizes = {**{f"{k} {name}": statistics.mean(len(r.value) for r in built[name]) for name in modes for k in ("build", "read")},
             **{f"deferral {k} {name}": statistics.mean(map(len, dumped[name])) for name in dumped for k in ("dump", "parse")}}
    base = {"build": "build decision", "read": "read decision", "deferral dump": "deferral dump without origin",
            "deferral parse": "deferral parse without origin"}
    ref_of = {step: base[next(k for k in base if step.startswith(k))] for step in steps}
    # The machine is shared and noisy: every round runs every step once, interleaved, and each
    # ratio is taken within its round (its median over rounds); the times are the best round.
    times: dict[str, list[float]] = {step: [] for step in steps}
    for _ in range(args.repeat):
        for step, fn in steps.items():
            times[step].append(per_record_us(fn, n))
    ratios = {step: statistics.median(t / r for t, r in zip(times[step], times[ref_of[step]])) for step in steps}
    print(f"{n} ISEAR events, {args.repeat} interleaved rounds")
    print(f"{'step':<32}{'best us/record':>15}{'median us':>10}{'ratio':>8}{'bytes':>8}")
    for step in steps:
        print(f"{step:<32}{min(times[step]):>15.2f}{statistics.median(times[step]):>10.2f}{ratios[step]:>8.2f}{sizes[step]:>8.0f}")
    print(json.dumps({step: {"best_us": round(min(times[step]), 3), "ratio": round(ratios[step], 3)} for step in steps}))


if __name__ == "__main__":
    main()
