"""``cascade simulate`` events/s of this checkout against another (e.g. main) in the same run.

    python bench/simulate_speed.py --baseline ../../main [--data ../shared/data/isear.jsonl.gz]
        [--llm gpt-3.5-turbo-1106] [--shuffle-seed 0] [--rounds 5] [-- extra simulate flags]

Each round runs ``cascade simulate --json`` once per checkout (alternating, so both see the same
load on a shared machine) with this checkout's interpreter and the checkout's own ``cascade``
package first on the path. Reported: the best and the median events/s of each (the report's own
figure: the stream loop, not start-up) and their ratio, and whether the two reports are equal
apart from timing (the decisions, hence every count, must not change with speed-ups).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMING = {"events_per_second", "seconds"}


def run(checkout: Path, flags: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, "-m", "workers.cli", "simulate", *flags, "--json", "--quiet"],
                         cwd=checkout, env=env, check=True, capture_output=True, text=True).stdout
    report: dict = json.loads(out)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="the other checkout (its repository root)")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "isear.jsonl.gz")
    ap.add_argument("--llm", default="gpt-3.5-turbo-1106")
    ap.add_argument("--shuffle-seed", type=int, default=0, help="-1: file order")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("extra", nargs="*", help="more cascade simulate flags, after --")
    args = ap.parse_args()
    flags = ["--data", str(args.data.resolve()), "--llm", args.llm, *args.extra]
    if args.shuffle_seed >= 0:
        flags += ["--shuffle-seed", str(args.shuffle_seed)]
    speeds: dict[str, list[float]] = {"baseline": [], "this": []}
    reports: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, checkout in (("baseline", args.baseline.resolve()), ("this", REPO)):
            reports[name] = run(checkout, flags)
            speeds[name].append(reports[name]["events_per_second"])
    for name, s in speeds.items():
        print(f"{name:<9} best {max(s):8,.0f} ev/s   median {statistics.median(s):8,.0f} ev/s   "
              f"({', '.join(f'{v:,.0f}' for v in s)})")
    print(f"ratio     best {max(speeds['this']) / max(speeds['baseline']):.2f}   "
          f"median {statistics.median(speeds['this']) / statistics.median(speeds['baseline']):.2f}")
    a, b = ({k: v for k, v in reports[n].items() if k not in TIMING} for n in ("baseline", "this"))
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    print("reports equal apart from timing" if not differ else f"reports differ in: {', '.join(differ)}")
    for k in ("events", "llm_call_fraction", "accuracy", "agreement_with_llm"):
        print(f"  {k}: baseline {a.get(k)}  this {b.get(k)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
