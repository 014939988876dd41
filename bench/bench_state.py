"""State-layer throughput against a local Redis, next to raw redis-py with the same pipelining.

    python bench/bench_state.py [--url redis://127.0.0.1:6379/15] [--batch 64] [--seconds 2]

Each line runs one operation in batches of ``--batch`` for ``--seconds`` and prints operations
per second (one op = one key looked up / one budget take / one event claimed) and the ratio to
the raw redis-py equivalent measured in the same run (target: at least 0.5).
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Callable

import redis

from cascade.config import RedisConfig, StateConfig
from cascade.messages import Decision
from cascade.state import BudgetLimit, BudgetRequest, cache_key
from cascade.state.redis_store import RedisState


def rate(fn: Callable[[], object], per_call: int, seconds: float) -> float:
    fn()  # warm-up: connections, script load
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn()
        n += 1
    return n * per_call / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--keys", type=int, default=4096, help="distinct cache keys looked up")
    args = ap.parse_args()
    b = args.batch
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    state = RedisState(RedisConfig(url=args.url, key_prefix=prefix), StateConfig(cache_cheap_answers=True))
    raw = redis.Redis.from_url(args.url)
    try:
        # Cache: every key holds a decision, so each lookup also pays for decoding a hit.
        keys = [cache_key("bench", ["a", "b", "c"], f"text number {i}") for i in range(args.keys)]
        decision = Decision(event_id="e", label="a", tier="llm", confidence=0.93, reason="llm",
                            model_versions={"logistic": 12345})  # fmt: skip
        for i in range(0, len(keys), 512):
            state.put_decisions([(k, decision) for k in keys[i : i + 512]])
        batches = [keys[i : i + b] for i in range(0, len(keys) - b + 1, b)]
        full_batches = [[state.keys.cache + k for k in batch] for batch in batches]
        it = {"get": 0, "raw_get": 0}

        def state_get() -> None:
            it["get"] = (it["get"] + 1) % len(batches)
            out = state.get_decisions(batches[it["get"]])
            assert out[0] is not None

        def raw_get() -> None:
            it["raw_get"] = (it["raw_get"] + 1) % len(full_batches)
            pipe = raw.pipeline(transaction=False)
            for k in full_batches[it["raw_get"]]:
                pipe.get(k)
            pipe.execute()

        # Budgets: the counters never run out, so every take does the full check-and-count.
        one = [BudgetLimit(name="calls_per_minute", metric="calls", seconds=60, limit=1e15)]
        three = one + [
            BudgetLimit(name="calls_per_day", metric="calls", seconds=86400, limit=1e15),
            BudgetLimit(name="money_per_day", metric="money", seconds=86400, limit=1e15),
        ]
        reqs = [BudgetRequest(f"tenant{i % 4}", 1, 0, 0.01) for i in range(b)]
        raw_counters = [f"{prefix}raw:ctr:{i % 4}" for i in range(b)]

        def raw_incr(per_take: int = 1) -> Callable[[], None]:
            """The raw equivalent of a take: one INCR per window."""

            def run() -> None:
                pipe = raw.pipeline(transaction=False)
                for k in raw_counters:
                    for w in range(per_take):
                        pipe.incr(f"{k}:{w}")
                pipe.execute()

            return run

        # Idempotency: fresh ids each batch (a first claim writes a key).
        seq = {"n": 0}

        def claim() -> None:
            base = seq["n"]
            seq["n"] += b
            state.claim_events([f"ev{base + i}" for i in range(b)], ttl_s=60)

        def raw_setnx() -> None:
            base = seq["n"]
            seq["n"] += b
            pipe = raw.pipeline(transaction=False)
            for i in range(b):
                pipe.set(f"{prefix}raw:evt:ev{base + i}", b"1", nx=True, px=60_000)
            pipe.execute()

        s = args.seconds
        rows = [
            ("cache lookups (get_decisions, hits)", rate(state_get, b, s), "pipelined GET", rate(raw_get, b, s)),
            ("budget takes, 1 window", rate(lambda: state.take_budgets(reqs, one), b, s),
             "pipelined INCR", rate(raw_incr(1), b, s)),
            ("budget takes, 3 windows", rate(lambda: state.take_budgets(reqs, three), b, s),
             "pipelined INCR x3", rate(raw_incr(3), b, s)),
            ("event claims (claim_events)", rate(claim, b, s), "pipelined SET NX PX", rate(raw_setnx, b, s)),
        ]  # fmt: skip
        info = raw.info("server")
        print(f"redis {info['redis_version']} at {args.url}, redis-py {redis.__version__}, "
              f"batch {b}, {s:.1f} s per line")
        print(f"{'operation':<38} {'ops/s':>10}   {'raw redis-py':<20} {'ops/s':>10}  ratio")
        for name, ops, raw_name, raw_ops in rows:
            print(f"{name:<38} {ops:>10,.0f}   {raw_name:<20} {raw_ops:>10,.0f}  {ops / raw_ops:5.2f}")
        assert not state.errors, state.errors
    finally:
        batch: list[bytes] = []
        for k in raw.scan_iter(f"{prefix}*", count=5000):
            batch.append(k)
            if len(batch) >= 5000:
                raw.unlink(*batch)
                batch.clear()
        if batch:
            raw.unlink(*batch)
        state.close()
        raw.close()


if __name__ == "__main__":
    main()
