"""Latency and throughput of the `openai` backend against the local SmolLM2-135M server.

    python bench/local_llm.py [--data ../shared/data/isear.jsonl.gz] [--events 40] [--concurrency 1 2 4]

Starts llama-cpp-python's server (scripts/install_local_llm.sh installs it) on a free port, asks
it about the first N shuffled events at each concurrency, and prints one JSON line per setting:
calls/s, latency percentiles, tokens per call, the fraction of answers on the label set, and the
accuracy against the gold labels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cascade.config import load_config  # noqa: E402
from cascade.evaluation.data import labels_of, read_stream  # noqa: E402
from cascade.task import Task  # noqa: E402
from cascade.tiers.llm import make_backend  # noqa: E402
from devtools.local_llm import MODEL_NAME, start_llm_server  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("../shared/data/isear.jsonl.gz"))
    p.add_argument("--events", type=int, default=40)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--n-threads", type=int, default=2)
    args = p.parse_args()
    rows = read_stream(args.data, shuffle_seed=0, limit=args.events)
    started = time.perf_counter()
    server = start_llm_server(None, run_dir=Path(tempfile.mkdtemp()), n_threads=args.n_threads)
    print(json.dumps({"server_start_s": round(time.perf_counter() - started, 2)}), flush=True)
    try:
        for c in args.concurrency:
            config = load_config(None, task={"labels": sorted(labels_of(rows))}, llm={
                "backend": "openai", "name": MODEL_NAME, "base_url": server.base_url, "concurrency": c,
                "structured_output": "json_object", "timeout_s": 120})
            task = Task(config.task)
            backend = make_backend(task, config.llm)
            backend.answer([rows[0].event])  # warm
            t0 = time.perf_counter()
            answers = backend.answer([r.event for r in rows])
            seconds = time.perf_counter() - t0
            lat = sorted(a.latency_s for a in answers)
            print(json.dumps({
                "concurrency": c, "events": len(rows), "seconds": round(seconds, 2),
                "calls_per_s": round(len(rows) / seconds, 2),
                "latency_p50_s": round(statistics.median(lat), 3),
                "latency_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3),
                "tokens_in_mean": round(statistics.mean(a.tokens_in for a in answers), 1),
                "tokens_out_mean": round(statistics.mean(a.tokens_out for a in answers), 1),
                "on_label_set": sum(a.label is not None for a in answers) / len(answers),
                "accuracy": round(sum(a.label == r.gold for a, r in zip(answers, rows)) / len(rows), 3),
            }), flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
