"""Performance smoke, run by ``make test``: an order-of-magnitude slowdown fails CI.

Three ratios, each against a baseline measured in the same run (machines are noisy, ratios less so):

* ``cascade simulate`` (the in-process engine, batch size 1, ISEAR shuffled, mu 0.3) against a
  bare river predict-and-learn loop over the same events; floor 0.6 (0.4 until the logistic tier
  learned in numpy, issue 18; measured about 1.5 since).
* the default tier alone (featurise, score and learn each event: the numpy logistic tier)
  against the same loop with river's logistic tier (bench/river_logistic.py); floor 1.2
  (measured 1.5-3.5 on the shared streams, bench/cheap_tiers.py): the numpy path losing its
  lead over river fails.
* the tier worker (parse, idempotency and cache read, features, scoring, deferral) against a
  pass-through worker that copies each record, both in the same consume-produce-commit loop on a
  private Tansu broker and the local Redis (bench/worker_throughput.py, short); per CPU second,
  the steadier figure; floor 0.25 (measured about 0.4).

    python bench/smoke.py [--data-dir ../shared/data] [--events 3000] [--worker-events 8000]

Exits 1 when a ratio is under its floor, 0 otherwise (and when the data is absent: it says so).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from river import linear_model, optim  # noqa: E402

from bench.river_logistic import RiverLogisticTier  # noqa: E402
from bench.worker_throughput import measure  # noqa: E402
from cascade.config import CascadeConfig, LogisticTierConfig, load_config  # noqa: E402
from cascade.evaluation.data import LabelledEvent, labels_of, read_stream  # noqa: E402
from cascade.evaluation.simulate import simulate  # noqa: E402
from cascade.features import HashedNgrams  # noqa: E402
from cascade.logging import configure_logging  # noqa: E402
from cascade.tiers.base import Tier  # noqa: E402
from cascade.tiers.registry import build_tier  # noqa: E402

GPT = "gpt-3.5-turbo-1106"
SIMULATE_FLOOR, TIER_FLOOR, STEP_FLOOR = 0.6, 1.2, 0.25


def config_for(rows: list[LabelledEvent]) -> CascadeConfig:
    return load_config(None, task={"labels": sorted(labels_of(rows))}, llm={"name": GPT}, deferral={"mu": 0.3})


def bare_river_loop(rows: list[LabelledEvent], config: CascadeConfig) -> float:
    """Events per second of features + predict_proba_one + learn_one on every event: the floor."""
    featurizer = HashedNgrams(config.features)
    model = linear_model.SoftmaxRegression(optimizer=optim.AdaGrad(1.0))
    start = time.perf_counter()
    for r in rows:
        x = featurizer.transform(r.event.text)
        x[-1] = 1.0
        model.predict_proba_one(x)
        y = r.event.payload["llm"][GPT]
        if y is not None:
            model.learn_one(x, y)
    return len(rows) / (time.perf_counter() - start)


def tier_loop(rows: list[LabelledEvent], tier: Tier) -> float:
    """Events per second of the tier's own prepare + predict_proba + learn, one event at a time."""
    start = time.perf_counter()
    for r in rows:
        inputs = tier.prepare([r.event])
        tier.predict_proba(inputs)
        y = r.event.payload["llm"][GPT]
        if y is not None:
            tier.learn(inputs, [y])
    return len(rows) / (time.perf_counter() - start)


def tier_ratio(rows: list[LabelledEvent]) -> tuple[float, float]:
    """The default tier's loop against river's logistic tier's, alternating, best of two each."""
    config = config_for(rows)
    tier_config = config.tiers[0]
    if not isinstance(tier_config, LogisticTierConfig):
        raise SystemExit(f"the smoke compares a logistic default tier with river's; the default is {tier_config.kind}")
    ours = river = 0.0
    for _ in range(2):
        ours = max(ours, tier_loop(rows, build_tier(tier_config, config.task.labels, config.features)))
        river = max(river, tier_loop(rows, RiverLogisticTier(tier_config, config.task.labels, config.features)))
    return ours, river


def simulate_ratio(rows: list[LabelledEvent]) -> tuple[float, float]:
    config = config_for(rows)
    bare = bare_river_loop(rows, config)
    ours = simulate(config, rows, progress=False).events_per_second
    return ours, bare


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--events", type=int, default=3000, help="ISEAR events simulated (and warming the worker's tier)")
    ap.add_argument("--worker-events", type=int, default=8000, help="records through each worker")
    args = ap.parse_args()
    path = Path(args.data_dir) / "isear.jsonl.gz"
    if not path.exists():
        print(f"SKIP: {path} not found (see ../shared/data/README.md)", file=sys.stderr)
        return 0
    configure_logging("console", "WARNING")
    rows = read_stream(path, shuffle_seed=0, limit=args.events)
    ours, bare = simulate_ratio(rows)
    sim = ours / bare
    print(f"simulate {ours:,.0f} ev/s, bare river loop {bare:,.0f} ev/s: ratio {sim:.2f} (floor {SIMULATE_FLOOR})")
    numpy_eps, river_eps = tier_ratio(rows)
    tier = numpy_eps / river_eps
    print(f"default tier loop {numpy_eps:,.0f} ev/s, river logistic tier loop {river_eps:,.0f} ev/s: "
          f"ratio {tier:.2f} (floor {TIER_FLOOR})")
    t = measure(rows, events=args.worker_events, rounds=2, idle_s=8.0, warm_events=len(rows) // 2, verbose=False)
    step = t.tier_cpu / t.passthrough_cpu
    print(f"tier worker {t.tier_cpu:,.0f} ev/CPU-s, pass-through worker {t.passthrough_cpu:,.0f} ev/CPU-s: "
          f"ratio {step:.2f} (floor {STEP_FLOOR})")
    failed = [name for name, ratio, floor in (("simulate", sim, SIMULATE_FLOOR), ("numpy tier", tier, TIER_FLOOR),
                                              ("tier batch step", step, STEP_FLOOR)) if ratio < floor]
    if failed:
        print(f"FAIL: {', '.join(failed)} under the floor: an order-of-magnitude slowdown", file=sys.stderr)
        return 1
    print("performance smoke: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
