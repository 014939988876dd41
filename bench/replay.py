"""`cascade replay` of 100,000 recorded events on a Tansu topic, next to a same-run baseline.

    python bench/replay.py [--data-dir ../shared/data] [--events 100000] [--sweep mu=0.1,0.2,0.3,0.5]
                           [--processes 2] [--bootstrap HOST:PORT]

Builds the stream from ISEAR (GPT-3.5's recorded answers, gold labels kept in the payload for
scoring), repeated to --events with unique ids and shuffled (seed 0), produces it to the events
topic of a fresh prefix on a private Tansu broker (or --bootstrap), then times

* the replay: the ``cascade replay --topic events`` command as a process (read the range, join
  the answers, one in-process cascade per sweep setting across --processes processes), and
* the baseline: ``cascade simulate``'s engine in-process on the same events in the same order,
  at one setting (the sweep's median mu), one process.

Prints both, the events/s ratio, and writes bench/out/replay.json and bench/out/replay.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

from cascade.config import load_config
from cascade.evaluation.data import LabelledEvent, read_stream
from cascade.evaluation.simulate import simulate
from cascade.messages import Event
from workers.kafka_io import OutRecord, ensure_topics, make_producer, produce_and_flush
from workers.topics import Topics

GPT = "gpt-3.5-turbo-1106"
OUT = Path(__file__).resolve().parent / "out"


def build_stream(data_dir: Path, n: int, seed: int = 0) -> list[dict]:
    rows = read_stream(data_dir / "isear.jsonl.gz")
    out = []
    rep = 0
    while len(out) < n:
        for r in rows:
            p = dict(r.event.payload)
            p["id"] = f"{rep}-{r.event.id}"
            p["label"] = r.gold
            out.append(p)
        rep += 1
    out = out[:n]
    random.Random(seed).shuffle(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--sweep", default="mu=0.1,0.2,0.3,0.5")
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--bootstrap", default=None, help="an existing broker (default: start a private Tansu)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)

    payloads = build_stream(args.data_dir, args.events)
    labels = sorted({p["label"] for p in payloads})
    broker = None
    if args.bootstrap is None:
        from devtools.services import start_tansu

        broker = start_tansu(None, run_dir=OUT / "replay-services")
        args.bootstrap = broker.bootstrap_servers
    try:
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        config = load_config(None, task={"name": "isear", "labels": labels}, llm={"name": GPT},
                             kafka={"bootstrap_servers": args.bootstrap, "topic_prefix": prefix, "partitions": 4})
        topics = Topics(config)
        ensure_topics(args.bootstrap, topics.all(), 4)
        t0 = time.perf_counter()
        producer = make_producer(config.kafka, linger_ms=20)
        try:
            for i in range(0, len(payloads), 5000):
                produce_and_flush(producer, [OutRecord(topics.events, p["id"].encode(), json.dumps(p).encode())
                                             for p in payloads[i : i + 5000]])
        finally:
            producer.close()
        produce_s = time.perf_counter() - t0
        print(f"produced {len(payloads):,} events to {topics.events} in {produce_s:.1f} s", file=sys.stderr)

        config_path = OUT / "replay-config.yaml"
        config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        cmd = [sys.executable, "-m", "workers.cli", "--config", str(config_path), "replay", "--topic", "events",
               "--sweep", args.sweep, "--target", "min_accuracy=0.65", "--processes", str(args.processes),
               "--plot", str(OUT / "replay.png"), "--json"]
        t0, ru0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        replay_s = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        replay_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)  # the command and its pool
        if proc.returncode not in (0, 3):
            raise SystemExit(f"replay failed ({proc.returncode})")
        report = json.loads(proc.stdout)

        # The baseline: the same events, the same order, one setting, in-process (cascade simulate's engine).
        mus = sorted(p["mu"] for p in report["points"])
        mu = mus[len(mus) // 2]
        rows = [LabelledEvent(Event(id=p["id"], text=p["text"], payload={k: v for k, v in p.items() if k != "label"}),
                              p["label"]) for p in payloads]
        cpu0 = time.process_time()
        base = simulate(config.model_copy(update={"deferral": config.deferral.model_copy(update={"mu": mu})}),
                        rows, progress=True)
        base_cpu = time.process_time() - cpu0
    finally:
        if broker is not None:
            broker.stop()

    settings = len(report["points"])
    replay_eps = settings * report["events_replayed"] / replay_s
    result = {
        "events": len(payloads), "settings": settings, "processes": args.processes, "sweep": args.sweep,
        "produce_seconds": produce_s, "replay_seconds": replay_s, "replay_load_seconds": report["seconds_load"],
        "replay_sweep_seconds": report["seconds_replay"], "replay_event_settings_per_second": replay_eps,
        "simulate_mu": mu, "simulate_seconds": base.seconds, "simulate_events_per_second": base.events_per_second,
        "ratio_replay_to_simulate": replay_eps / base.events_per_second,
        "replay_cpu_seconds": replay_cpu, "simulate_cpu_seconds": base_cpu,
        "ratio_cpu_per_event_setting": (replay_cpu / (settings * report["events_replayed"])) / (base_cpu / len(rows)),
        "load_average": os.getloadavg(),
        "missing_llm_answers": report["missing_llm_answers"], "recommendation": report["recommendation"],
        "points": [{k: p[k] for k in ("label", "llm_call_fraction", "agreement_with_llm", "accuracy", "seconds",
                                      "cpu_seconds")}
                   for p in report["points"]],
        "simulate_at_mu": {"llm_call_fraction": base.llm_call_fraction, "accuracy": base.accuracy},
    }
    (OUT / "replay.json").write_text(json.dumps(result, indent=2))
    print(f"\nreplay of {report['events_replayed']:,} events x {settings} settings, {args.processes} processes: "
          f"{replay_s:.1f} s wall (read+join {report['seconds_load']:.1f} s, sweep {report['seconds_replay']:.1f} s)")
    print(f"  {replay_eps:,.0f} event-settings/s")
    print(f"baseline cascade simulate, mu={mu:g}, 1 process: {base.seconds:.1f} s, {base.events_per_second:,.0f} events/s")
    print(f"ratio replay/simulate, events/s: {result['ratio_replay_to_simulate']:.2f}x")
    print(f"CPU: replay {replay_cpu:.1f} s (all processes), simulate {base_cpu:.1f} s; CPU per event-setting, "
          f"replay/simulate: {result['ratio_cpu_per_event_setting']:.2f}x; load average {os.getloadavg()[0]:.1f}")
    print("\nsetting      LLM calls  agreement  accuracy  seconds  CPU s")
    for p in result["points"]:
        print(f"{p['label']:<12} {p['llm_call_fraction']:>8.1%}  {p['agreement_with_llm']:.4f}     "
              f"{p['accuracy']:.4f}    {p['seconds']:>6.1f}  {p['cpu_seconds']:>5.1f}")
    print(f"simulate mu={mu:g} {base.llm_call_fraction:>8.1%}  -          {base.accuracy:.4f}")
    rec = report["recommendation"]
    print(f"\nrecommended for {rec['target']}: {rec['label']} ({rec['reason']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
