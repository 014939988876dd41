"""Events per second through a tier-1 worker against a pass-through worker on the same broker.

    python bench/worker_throughput.py [--data-dir ../shared/data] [--events 20000] [--rounds 2] [--enriched]
        [--tier logistic|nblr|river-logistic ...]

Both run the same consume → process → produce (acks=all) → commit loop of ``workers/loop.py``
against a private Tansu broker and the local Redis; the pass-through copies each record to an
output topic, the tier worker parses, checks idempotency and the decision cache, runs the
logistic tier and its policy (warm: loaded from the registry, trained on the first 3,000 ISEAR
events by the in-process cascade) and produces decisions or deferrals. Rounds alternate the two
so a noisy machine hurts both alike. Target: the tier worker at least 0.5 of pass-through.
``--enriched`` adds a third worker to every round, the tier worker with ``output.mode: enriched``
(the events carry two headers), and its ratio to the tier worker of the same round.
``--tier`` names the first tier's kind (several: each measured in turn, every round alternating with
its own pass-through); ``river-logistic`` is the logistic tier as river ran it before issue 18
(bench/river_logistic.py). Redis: ``CASCADE_TEST_REDIS_URL`` if set, else db 13 of the local one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kafka.consumer.fetcher import ConsumerRecord  # noqa: E402

from bench import river_logistic  # noqa: E402
from cascade.config import CascadeConfig, OutputConfig, load_config  # noqa: E402
from cascade.evaluation.data import LabelledEvent, labels_of, read_stream  # noqa: E402
from cascade.learning.registry import publish_stage  # noqa: E402
from cascade.logging import configure_logging  # noqa: E402
from cascade.routing.cascade import Cascade  # noqa: E402
from cascade.state import make_state  # noqa: E402
from devtools.services import ensure_redis, start_tansu  # noqa: E402
from workers.kafka_io import OutRecord, ensure_topics, make_producer, produce_and_flush  # noqa: E402
from workers.loop import BatchResult, Worker  # noqa: E402
from workers.tier_worker import TierWorker  # noqa: E402
from workers.topics import Topics  # noqa: E402

GPT = "gpt-3.5-turbo-1106"


class Timing:
    """First batch handed to process() → last batch acknowledged and recorded, in wall-clock
    time and in this process's CPU time (all its threads: the worker is all that runs here then).
    CPU time is the steadier figure on a shared machine: time stolen by other guests is not in it."""

    def __init__(self) -> None:
        self.first: tuple[float, float] | None = None
        self.last = (0.0, 0.0)
        self.count = 0

    def wrap(self, records: list[ConsumerRecord], result: BatchResult) -> BatchResult:
        self.count += len(records)
        result.on_ack.append(lambda: setattr(self, "last", (time.perf_counter(), time.process_time())))
        return result

    def start(self) -> None:
        if self.first is None:
            self.first = (time.perf_counter(), time.process_time())

    def rate(self) -> float:
        """Events per wall-clock second."""
        return self.count / (self.last[0] - (self.first or self.last)[0])

    def cpu_rate(self) -> float:
        """Events per CPU second."""
        return self.count / (self.last[1] - (self.first or self.last)[1])


class PassThrough(Worker):
    role = "passthrough"

    def __init__(self, config: CascadeConfig, group: str, timing: Timing) -> None:
        super().__init__(config, [Topics(config).events], group, metrics_port=0)
        self.out = Topics(config).prefix + "passthrough"
        self.timing = timing

    def process(self, records: list[ConsumerRecord]) -> BatchResult:
        self.timing.start()
        return self.timing.wrap(records, BatchResult([OutRecord(self.out, r.key, r.value) for r in records]))


class TimedTier(TierWorker):
    def __init__(self, config: CascadeConfig, timing: Timing) -> None:
        super().__init__(config, config.tiers[0].name, metrics_port=0)
        self.timing = timing

    def process(self, records: list[ConsumerRecord]) -> BatchResult:
        self.timing.start()
        return self.timing.wrap(records, super().process(records))


@dataclass
class Throughput:
    """Best events/s of each worker, and per CPU second."""

    passthrough: float
    tier: float
    passthrough_cpu: float
    tier_cpu: float
    # With --enriched: the median over rounds of (enriched tier worker / tier worker), wall and CPU.
    enriched_ratio: float | None = None
    enriched_cpu_ratio: float | None = None


def measure(rows: list[LabelledEvent], events: int, rounds: int, idle_s: float = 10.0, warm_events: int = 3000,
            verbose: bool = True, enriched: bool = False, tier: str = "logistic") -> Throughput:
    """Both workers over the same ``events`` records on a private Tansu, ``rounds`` times each;
    the tier worker serves a first tier of kind ``tier``."""
    say = print if verbose else (lambda *_: None)
    if tier == "river-logistic":
        river_logistic.register()
    broker = start_tansu(None)
    redis = ensure_redis(os.environ.get("CASCADE_TEST_REDIS_URL", "redis://127.0.0.1:6379/13"))
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    config = load_config(None, task={"labels": sorted(labels_of(rows))}, llm={"name": GPT}, deferral={"mu": 0.3},
                         tiers=[{"name": tier, "kind": tier}],
                         kafka={"bootstrap_servers": broker.bootstrap_servers, "topic_prefix": prefix, "partitions": 4},
                         redis={"url": redis.url, "key_prefix": prefix}, state={"backend": "redis"})
    try:
        # A warm tier: the in-process cascade learns from the first events; its snapshots go to the registry.
        warm = Cascade(config.model_copy(update={"state": config.state.model_copy(update={"backend": "memory"})}))
        for r in rows[:warm_events]:
            warm.process([r.event])
        stage = warm.stages[0]
        topics = Topics(config)
        ensure_topics(broker.bootstrap_servers, [*topics.all(), prefix + "passthrough"], 4)
        producer = make_producer(config.kafka)
        payloads = []
        for i in range(events):
            r = rows[i % len(rows)]
            payloads.append(OutRecord(topics.events, f"{i}".encode(), json.dumps({**r.event.payload, "id": f"ev{i}"}).encode(),
                                      [("trace-id", f"{i:032x}".encode()), ("source", b"web")]))
        for i in range(0, len(payloads), 2000):
            produce_and_flush(producer, payloads[i : i + 2000])
        producer.close()
        say(f"{events} events on {topics.events} (4 partitions), broker {broker.bootstrap_servers}")
        kinds = ("passthrough", "tier", "enriched") if enriched else ("passthrough", "tier")
        results: dict[str, list[float]] = {k: [] for k in kinds}
        cpu: dict[str, list[float]] = {k: [] for k in kinds}
        for rnd in range(rounds):
            for kind in kinds:
                timing = Timing()
                # A fresh group each round reads the whole topic; a fresh idempotency space too.
                group_cfg = config.model_copy(update={
                    "redis": config.redis.model_copy(update={"key_prefix": f"{prefix}{rnd}{kind}:"}),
                    "output": OutputConfig(mode="enriched" if kind == "enriched" else "decision"),
                })
                worker = (PassThrough(group_cfg, f"{prefix}pt{rnd}", timing) if kind == "passthrough"
                          else TimedTier(group_cfg, timing))
                if isinstance(worker, TimedTier):
                    worker.group = f"{prefix}{kind}{rnd}"
                    publish_stage(make_state(group_cfg), stage)
                    worker.follower.poll()
                worker.run(max_idle_s=idle_s)
                if timing.count != events:
                    raise SystemExit(f"{kind} round {rnd}: processed {timing.count} of {events}")
                results[kind].append(timing.rate())
                cpu[kind].append(timing.cpu_rate())
                say(f"round {rnd} {kind:<12} {timing.rate():>9,.0f} events/s   {timing.cpu_rate():>9,.0f} events/CPU-s")
    finally:
        broker.stop()
        redis.stop()
    t = Throughput(max(results["passthrough"]), max(results["tier"]), max(cpu["passthrough"]), max(cpu["tier"]))
    if enriched:  # within a round, so the machine's drift between rounds cancels
        t.enriched_ratio = statistics.median(e / d for e, d in zip(results["enriched"], results["tier"]))
        t.enriched_cpu_ratio = statistics.median(e / d for e, d in zip(cpu["enriched"], cpu["tier"]))
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--enriched", action="store_true", help="also the tier worker with output.mode: enriched")
    ap.add_argument("--tier", nargs="+", default=["logistic"], help="first tier kind(s): logistic, nblr, river-logistic")
    args = ap.parse_args()
    path = Path(args.data_dir) / "isear.jsonl.gz"
    if not path.exists():
        print(f"SKIP: {path} not found (see ../shared/data/README.md)", file=sys.stderr)
        return 0
    configure_logging("console", "WARNING")
    rows = read_stream(path, shuffle_seed=0)
    for tier in args.tier:
        t = measure(rows, args.events, args.rounds, enriched=args.enriched, tier=tier)
        print(f"\n{tier}, best of {args.rounds}: pass-through {t.passthrough:,.0f} ev/s, tier-1 worker {t.tier:,.0f} ev/s, "
              f"ratio {t.tier / t.passthrough:.2f} (target >= 0.5)")
        print(f"{tier}, per CPU second:  pass-through {t.passthrough_cpu:,.0f}, tier-1 worker {t.tier_cpu:,.0f}, "
              f"ratio {t.tier_cpu / t.passthrough_cpu:.2f}\n")
        if t.enriched_ratio is not None:
            print(f"{tier}, enriched output: tier worker enriched / decision, median of rounds: "
                  f"{t.enriched_ratio:.3f} (wall), {t.enriched_cpu_ratio:.3f} (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
