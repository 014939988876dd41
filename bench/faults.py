"""The fault table: broker and Redis outages mid-stream, the pipeline as processes on a Tansu and
a Redis of each scenario's own (devtools/faults.py), on recorded data. Counts from the topics:
events, decided, duplicates, lost, dead-lettered, worker exits.

    PYTHONPATH=. python bench/faults.py --data ../shared/data/isear.jsonl.gz --events 3000

The "before" rows: the same script with PYTHONPATH pointing at a checkout of the code before
workers/outage.py (the workers run from PYTHONPATH; devtools/faults.py copied into it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cascade.evaluation.data import labels_of, read_stream
from devtools.faults import SCENARIOS, run_scenario

LLM = "gpt-3.5-turbo-1106"
COLUMNS = ["scenario", "events", "decided_at_fault", "decided", "duplicates", "lost", "dead_lettered", "worker_exits",
           "loss_detected", "llm_held", "seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/isear.jsonl.gz"))
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=100.0, help="events per second fed")
    ap.add_argument("--scenario", action="append", choices=SCENARIOS)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all decisions after the fault")
    ap.add_argument("--run-dir", type=Path, default=Path("/tmp/cascade-faults"))
    args = ap.parse_args()
    rows = read_stream(args.data, shuffle_seed=0, limit=args.events)
    payloads = [(r.event.id, json.dumps(r.event.payload).encode()) for r in rows]
    labels = sorted(labels_of(rows))
    results = []
    for s in args.scenario or [s for s in SCENARIOS if s != "none"]:
        r = run_scenario(s, payloads, labels, LLM, args.run_dir / s, rate=args.rate, timeout_s=args.timeout)
        results.append(r.row())
        print(json.dumps(results[-1] | {"exits": r.worker_exits}), flush=True)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in results:
        print("| " + " | ".join("-" if row[c] is None else str(row[c]) for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
