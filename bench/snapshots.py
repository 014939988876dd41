"""Snapshot size and encode/decode time of a trained logistic tier: the pickle format it replaced
against the data-only format of ``cascade/snapshots.py``, for river's tier (bench/river_logistic.py,
the tier until issue 18) and for the numpy tier that replaced it (whose restore also converts river's).

    python bench/snapshots.py [--data-dir ../shared/data] [--events 2000] [--repeat 20]

The tier (default config) learns the first ``--events`` ISEAR events, shuffled with seed 0, from
the recorded answers of gpt-3.5-turbo-1106. "Pickle" is the former format rebuilt here (the
magic ``CSNAP1`` and a protocol-5 pickle of the river model); encode is ``snapshot()`` or the
pickling, decode is ``restore()`` into a fresh tier or the unpickling. Times are medians.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.river_logistic import RiverLogisticTier  # noqa: E402
from cascade.config import LogisticTierConfig, load_config  # noqa: E402
from cascade.evaluation.data import labels_of, read_stream  # noqa: E402
from cascade.routing.cascade import Cascade  # noqa: E402
from cascade.tiers.base import Tier  # noqa: E402

GPT = "gpt-3.5-turbo-1106"


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    rows = read_stream(args.data_dir / "isear.jsonl.gz", shuffle_seed=0)
    config = load_config(None, task={"labels": sorted(labels_of(rows))}, llm={"name": GPT})
    def make_tier() -> Tier:
        return Cascade(config).stages[0].tier

    tier_config = config.tiers[0]
    assert isinstance(tier_config, LogisticTierConfig)
    river, tier = RiverLogisticTier(tier_config, config.task.labels, config.features), make_tier()
    demos = [r.event for r in rows if r.event.payload["llm"][GPT] is not None][: args.events]
    for start in range(0, len(demos), 64):
        batch = demos[start : start + 64]
        for t in (river, tier):
            t.learn(t.prepare(batch), [e.payload["llm"][GPT] for e in batch])

    def pickled() -> bytes:
        state = {"labels": river.labels, "model": river.model}
        return b"CSNAP1" + pickle.dumps({"kind": river.kind, "version": river.version, "state": state}, protocol=5)

    fresh_river, fresh = RiverLogisticTier(tier_config, config.task.labels, config.features), make_tier()
    old, river_data, new = pickled(), river.snapshot(), tier.snapshot()
    report = {
        "events": len(demos),
        "weights": sum(len(w) for w in river.model.weights.values()),
        "pickle": {"bytes": len(old), "encode_ms": median_ms(pickled, args.repeat),
                   "decode_ms": median_ms(lambda: pickle.loads(old[6:]), args.repeat)},
        "river_data": {"bytes": len(river_data), "encode_ms": median_ms(river.snapshot, args.repeat),
                       "decode_ms": median_ms(lambda: fresh_river.restore(river_data), args.repeat),
                       "convert_ms": median_ms(lambda: fresh.restore(river_data), args.repeat)},
        "numpy_data": {"bytes": len(new), "encode_ms": median_ms(tier.snapshot, args.repeat),
                       "decode_ms": median_ms(lambda: fresh.restore(new), args.repeat)},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
