"""The LLM worker against a fake OpenAI-compatible server: continuous dispatch against the batch barrier.

    python bench/llm_worker.py [--concurrency 16 64 256] [--measure 30] [--duration 120]
        [--paced-concurrency 64] [--modes continuous batch] [--throttle 0.0]

The fake server (devtools/fake_llm.py) runs in this process: latency p50 0.8 s, p95 3 s, p99 8 s,
optionally a share of 429s with Retry-After (``--throttle 0.02``). The LLM worker runs as its own
process (``cascade worker --tier llm``) on a private Tansu broker and the local Redis
(``CASCADE_TEST_REDIS_URL`` if set, else db 12), with ``llm.dispatch`` set to each mode in turn.

1. Backlog: deferred events preloaded on the LLM topic; once calls flow, answered calls are
   counted for ``--measure`` seconds after a 5 s warm-up: calls/s against the ideal, concurrency
   over the mean latency of the calls the server answered in that window. Target ≥ 0.9.
2. Paced: events produced at half the ideal rate of ``--paced-concurrency`` for ``--duration``
   seconds; end-to-end latency (produced → decision acknowledged by the broker, from the decision
   record's timestamp) against the calls' own latency. Targets: e2e p50 ≤ 1.5× call p50, p99 ≤
   1.5× call p99, and no rise (p50 of the last third against the first third).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kafka import KafkaConsumer  # noqa: E402

from cascade.config import CascadeConfig, load_config  # noqa: E402
from cascade.messages import Decision, Deferred, Event  # noqa: E402
from devtools.fake_llm import FakeLLM, Latency, Settings  # noqa: E402
from devtools.services import ensure_redis, free_port, start_tansu  # noqa: E402
from workers.kafka_io import OutRecord, ensure_topics, make_producer, produce_and_flush, send_records  # noqa: E402
from workers.run import write_worker_config  # noqa: E402
from workers.topics import Topics  # noqa: E402

LABELS = ["anger", "fear", "joy", "sadness"]
WARM_S = 5.0
PARTITIONS = 4


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def make_config(bootstrap: str, redis_url: str, fake: FakeLLM, mode: str, concurrency: int) -> CascadeConfig:
    prefix = f"b{uuid.uuid4().hex[:8]}."
    config = load_config(None, task={"labels": LABELS},
                         llm={"backend": "openai", "name": "fake", "base_url": fake.base_url, "concurrency": concurrency,
                              "dispatch": mode, "window": max(512, 4 * concurrency),
                              "partition_window": max(256, 2 * concurrency), "timeout_s": 60.0},
                         kafka={"bootstrap_servers": bootstrap, "topic_prefix": prefix, "partitions": PARTITIONS},
                         redis={"url": redis_url, "key_prefix": prefix}, state={"backend": "redis"})
    ensure_topics(bootstrap, Topics(config).all(), PARTITIONS)
    return config


def deferred(i: int, run: str) -> OutRecord:
    event = Event(id=f"{run}-{i}", text=f"event {i} of run {run}: how did it feel?")
    return OutRecord("", event.id.encode(), Deferred(event=event).model_dump_json().encode())


def start_worker(config: CascadeConfig, run_dir: Path) -> subprocess.Popen[bytes]:
    path, secrets = write_worker_config(config, run_dir)
    cmd = [sys.executable, "-m", "workers.cli", "--config", str(path), "worker", "--tier", "llm",
           "--metrics-port", str(free_port())]
    logf = (run_dir / f"llm-{config.llm.dispatch}.log").open("ab")
    return subprocess.Popen(cmd, stdout=logf, stderr=logf, env={**os.environ, **secrets})


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)  # its backlog is left behind on purpose
    proc.wait(30)


def wait_for(cond, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("the LLM worker made no call in time")
        time.sleep(0.05)


def backlog(bootstrap: str, redis_url: str, run_dir: Path, mode: str, c: int, measure_s: float,
            latency: Latency, throttle: float) -> dict[str, float | str]:
    with FakeLLM(Settings(labels=LABELS, latency=latency, throttle_rate=throttle)) as fake:
        config = make_config(bootstrap, redis_url, fake, mode, c)
        mean = latency.mean()
        n = int(c / mean * (WARM_S + measure_s) * 1.3) + 4 * c
        run = uuid.uuid4().hex[:6]
        producer = make_producer(config.kafka)
        try:
            produce_and_flush(producer, [deferred(i, run)._replace(topic=Topics(config).llm) for i in range(n)])
        finally:
            producer.close()
        proc = start_worker(config, run_dir)
        try:
            wait_for(lambda: fake.stats.requests > 0, 120)
            time.sleep(WARM_S)
            with fake.lock:
                a0, l0 = fake.stats.answered, fake.stats.latency_sum_s
            time.sleep(measure_s)
            with fake.lock:
                a1, l1 = fake.stats.answered, fake.stats.latency_sum_s
        finally:
            stop_worker(proc)
    calls = a1 - a0
    if calls >= n - 4 * c:
        print(f"  warning: the backlog of {n} ran low", file=sys.stderr)
    # The ideal from the latency distribution's mean: the calls that complete within a window are
    # a biased sample of it (a barrier's window holds the short calls of a few batches).
    ideal = c / mean
    rate = calls / measure_s
    return {"mode": mode, "concurrency": c, "calls_per_s": round(rate, 2), "ideal_calls_per_s": round(ideal, 2),
            "of_ideal": round(rate / ideal, 3), "mean_call_s": round(mean, 3),
            "window_mean_call_s": round((l1 - l0) / calls, 3) if calls else None}


def paced(bootstrap: str, redis_url: str, run_dir: Path, mode: str, c: int, duration_s: float,
          latency: Latency, throttle: float, drain_s: float = 60.0) -> dict[str, float | str | int]:
    with FakeLLM(Settings(labels=LABELS, latency=latency, throttle_rate=throttle)) as fake:
        config = make_config(bootstrap, redis_url, fake, mode, c)
        rate = 0.5 * c / latency.mean()
        run = uuid.uuid4().hex[:6]
        topic = Topics(config).llm
        produced: dict[str, float] = {}
        proc = start_worker(config, run_dir)
        producer = make_producer(config.kafka)
        try:
            time.sleep(8)  # joined its group (Tansu holds the first join ~3 s)
            start = time.time()
            i = 0
            while time.time() - start < duration_s:
                due = start + i / rate
                time.sleep(max(0.0, due - time.time()))
                rec = deferred(i, run)
                event_id = rec.key.decode() if rec.key else ""
                # first_seen: when it was produced (e2e latency counts from here)
                value = Deferred.model_validate_json(rec.value).model_copy(update={"first_seen": time.time()})
                produced[event_id] = value.first_seen
                send_records(producer, [OutRecord(topic, rec.key, value.model_dump_json().encode())])
                i += 1
            producer.flush()
            decided = collect(config, produced, drain_s)
        finally:
            producer.close()
            stop_worker(proc)
        calls = list(fake.stats.latencies)
    e2e = [(produced[k], t - produced[k]) for k, t in decided.items()]
    e2e.sort()
    lat = [x for _, x in e2e]
    third = max(1, len(e2e) // 3)
    first, last = [x for _, x in e2e[:third]], [x for _, x in e2e[-third:]]
    return {"mode": mode, "concurrency": c, "rate_per_s": round(rate, 2), "produced": len(produced),
            "decided": len(decided), "call_p50_s": round(quantile(calls, 0.5), 3),
            "call_p99_s": round(quantile(calls, 0.99), 3), "e2e_p50_s": round(quantile(lat, 0.5), 3),
            "e2e_p99_s": round(quantile(lat, 0.99), 3), "e2e_p50_first_third_s": round(statistics.median(first), 3),
            "e2e_p50_last_third_s": round(statistics.median(last), 3)}


def collect(config: CascadeConfig, produced: dict[str, float], drain_s: float) -> dict[str, float]:
    """Decision times (the record's broker timestamp) of the produced events; waits up to
    ``drain_s`` after the pacing for the rest."""
    consumer = KafkaConsumer(Topics(config).decisions, bootstrap_servers=config.kafka.bootstrap_servers, group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False)
    out: dict[str, float] = {}
    deadline = time.monotonic() + drain_s
    try:
        while len(out) < len(produced) and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500).values():
                for r in recs:
                    d = Decision.model_validate_json(r.value)
                    out.setdefault(d.event_id, r.timestamp / 1000)
    finally:
        consumer.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--measure", type=float, default=30.0, help="seconds of backlog throughput per run")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of paced production")
    ap.add_argument("--paced-concurrency", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["continuous", "batch"], choices=["continuous", "batch"])
    ap.add_argument("--throttle", type=float, default=0.0, help="share of 429s with Retry-After (e.g. 0.02)")
    ap.add_argument("--skip-paced", action="store_true")
    args = ap.parse_args()
    latency = Latency(0.8, 3.0, 8.0)
    redis_url = os.environ.get("CASCADE_TEST_REDIS_URL", "redis://127.0.0.1:6379/12")
    run_dir = Path(tempfile.mkdtemp(prefix="bench-llm-"))
    redis = ensure_redis(redis_url, run_dir=run_dir)
    broker = start_tansu(None, run_dir=run_dir)
    results: dict[str, list] = {"backlog": [], "paced": []}
    try:
        for c in args.concurrency:
            for mode in args.modes:
                r = backlog(broker.bootstrap_servers, redis.url, run_dir, mode, c, args.measure, latency, args.throttle)
                results["backlog"].append(r)
                print(json.dumps(r), flush=True)
        if not args.skip_paced:
            for mode in args.modes:
                r = paced(broker.bootstrap_servers, redis.url, run_dir, mode, args.paced_concurrency, args.duration,
                          latency, args.throttle)
                results["paced"].append(r)
                print(json.dumps(r), flush=True)
    finally:
        broker.stop()
        redis.stop()
    print(json.dumps(results, indent=1))
    print(f"worker logs: {run_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
