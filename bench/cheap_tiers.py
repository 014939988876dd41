"""The cheap tiers against each other: how well they imitate the LLM online, and how fast.

    python bench/cheap_tiers.py [--data-dir ../shared/data] [--limit N] [--all-llms]

Prequential, as the in-process cascade learns: each event is featurised and scored alone, then
learned from the LLM's recorded answer (events whose answer is null are scored, never learned).
Agreement with the LLM is measured on the second half of the stream (events with an answer), also
among its 40% and 60% most confident events (the ones a deferral policy would let the tier
answer). Speed: events/s of the batch-1 prequential loop (featurise, score, learn), and of scoring
batches of 256 with the model the stream left (featurise, score: a tier worker; best of three
passes, the first of which includes the logistic tier's compiling its weights), each also as a
ratio to river's logistic tier in the same run. Rows:

- ``river-logistic``: the logistic tier as it was until issue 18 (river SoftmaxRegression,
  AdaGrad, lr 1.0; bench/river_logistic.py), the baseline;
- ``logistic``: today's tier, the same model learned in numpy (cascade/tiers/logistic.py);
- ``nblr``: NB-weighted logistic (NblrTier, its defaults: AdaGrad lr 0.5, alpha 1).
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.river_logistic import RiverLogisticTier  # noqa: E402
from cascade.config import FeatureConfig, LogisticTierConfig  # noqa: E402
from cascade.messages import Event  # noqa: E402
from cascade.tiers.base import Tier  # noqa: E402
from cascade.tiers.logistic import LogisticTier  # noqa: E402
from cascade.tiers.nblr import NblrTier  # noqa: E402

GPT, LLAMA = "gpt-3.5-turbo-1106", "llama-2-70b-chat"
STREAMS = [("isear", GPT), ("hatespeech", LLAMA)]  # the pairs the project reports
CROSS = [("isear", LLAMA), ("hatespeech", GPT)]
SCORE_BATCH = 256
SCORE_ROUNDS = 3  # the best of three passes: scoring a stream takes well under a second, easily disturbed
CONFIDENT = (0.4, 0.6)

TIERS: dict[str, Callable[[list[str]], Tier]] = {
    "river-logistic": lambda labels: RiverLogisticTier(LogisticTierConfig(name="logistic"), labels, FeatureConfig()),
    "logistic": lambda labels: LogisticTier(LogisticTierConfig(name="logistic"), labels, FeatureConfig()),
    "nblr": lambda labels: NblrTier("nblr", labels, 1.0, FeatureConfig()),
}


@dataclass
class Result:
    agreement: float
    confident: tuple[float, ...]
    prequential_eps: float
    scoring_eps: float


def read_rows(path: Path, limit: int | None) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit is not None else rows


def run(tier: Tier, events: list[Event], answers: list[str | None]) -> Result:
    predicted, confidence = [], []
    start = time.perf_counter()
    for event, answer in zip(events, answers):
        inputs = tier.prepare([event])
        p = tier.predict_proba(inputs)[0]
        predicted.append(int(p.argmax()))
        confidence.append(float(p.max()))
        if answer is not None:
            tier.learn(inputs, [answer])
    prequential = len(events) / (time.perf_counter() - start)

    scoring = 0.0
    for _ in range(SCORE_ROUNDS):
        start = time.perf_counter()
        for i in range(0, len(events), SCORE_BATCH):
            tier.predict_proba(tier.prepare(events[i : i + SCORE_BATCH]))
        scoring = max(scoring, len(events) / (time.perf_counter() - start))

    half = len(events) // 2
    index = {label: j for j, label in enumerate(tier.labels)}
    scored = [(c, index[a] == y) for a, y, c in zip(answers[half:], predicted[half:], confidence[half:]) if a is not None]
    conf = np.array([c for c, _ in scored])
    agree = np.array([a for _, a in scored], dtype=float)
    order = np.argsort(-conf, kind="stable")
    confident = tuple(float(agree[order[: max(1, round(f * len(order)))]].mean()) for f in CONFIDENT)
    return Result(float(agree.mean()), confident, prequential, scoring)


def main() -> int:
    repo = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=repo.parent / "shared" / "data")
    ap.add_argument("--limit", type=int, default=None, help="first N rows of each file (before shuffling)")
    ap.add_argument("--all-llms", action="store_true", help="also isear/Llama-2 and hatespeech/GPT-3.5")
    args = ap.parse_args()

    pairs = STREAMS + (CROSS if args.all_llms else [])
    missing = sorted({f"{args.data_dir / name}.jsonl.gz" for name, _ in pairs if not (args.data_dir / f"{name}.jsonl.gz").exists()})
    if missing:
        print(f"cheap-tier benchmark skipped: data not found ({', '.join(missing)}); pass --data-dir")
        return 0

    header = (
        f"{'stream':<11} {'LLM':<19} {'order':<8} {'tier':<14} {'agree':>6} {'@40%':>6} {'@60%':>6}"
        f" {'preq ev/s':>10} {'x':>5} {'score256 ev/s':>14} {'x':>5}"
    )
    print(header)
    print("-" * len(header))
    for name, llm in pairs:
        rows = read_rows(args.data_dir / f"{name}.jsonl.gz", args.limit)
        labels = sorted({r["label"] for r in rows} | {r["llm"][llm] for r in rows if r["llm"][llm] is not None})
        for order in ("shuffled", "file"):
            ordered = list(rows)
            if order == "shuffled":
                random.Random(0).shuffle(ordered)
            events = [Event(id=str(r["id"]), text=r["text"], payload=r) for r in ordered]
            answers = [r["llm"][llm] for r in ordered]
            base: Result | None = None
            for tier_name, make in TIERS.items():
                res = run(make(labels), events, answers)
                base = base or res
                print(
                    f"{name:<11} {llm:<19} {order:<8} {tier_name:<14} {res.agreement:>6.3f}"
                    + "".join(f" {c:>6.3f}" for c in res.confident)
                    + f" {res.prequential_eps:>10,.0f} {res.prequential_eps / base.prequential_eps:>5.2f}"
                    f" {res.scoring_eps:>14,.0f} {res.scoring_eps / base.scoring_eps:>5.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
