"""The learner under faults, the whole pipeline as processes on its own Tansu and Redis.

Each scenario feeds a recorded stream at a paced rate through the tier, LLM and learner workers,
injects a fault into the learner mid-stream, waits until every event is decided and the learner
has caught up, and counts: events, decided, duplicate decisions, demonstrations produced,
demonstrations learned (the current set's ``LearnerStep`` and its logistic tier's version) and
demonstrations learned twice.

    PYTHONPATH=. python bench/learner_faults.py --data ../shared/data/isear.jsonl.gz --events 3000

Scenarios:
- ``none``: no fault.
- ``kill-after-publish``: the learner exits as kill -9 would right after a publish, before the
  commit (``CASCADE_TEST_LEARNER_KILL_AFTER_PUBLISH=1``), three times in a row, restarted at once.
- ``redis-away-at-learner-start``: mid-stream the learner is stopped, Redis is saved and stopped,
  the learner started again while Redis is away, and Redis brought back (with its data) 8 s later.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import redis
from kafka import KafkaConsumer

from cascade.config import CascadeConfig, load_config
from cascade.evaluation.data import LabelledEvent, labels_of, read_stream
from cascade.learning.registry import model_names
from cascade.routing.build import build_stages
from cascade.state import make_state
from devtools.services import RedisHandle, free_port, start_redis, start_tansu
from workers.kafka_io import ensure_topics
from workers.learner_worker import KILL_AFTER_PUBLISH_ENV
from workers.run import collect_decisions, produce_events, stop_workers, worker_commands, write_worker_config
from workers.topics import Topics

LLM = "gpt-3.5-turbo-1106"


def config_for(bootstrap: str, redis_url: str, rows: list[LabelledEvent]) -> CascadeConfig:
    prefix = f"lf{uuid.uuid4().hex[:8]}."
    return load_config(None, task={"name": "isear", "labels": sorted(labels_of(rows))},
                       llm={"name": LLM, "backend": "recorded"},
                       kafka={"bootstrap_servers": bootstrap, "topic_prefix": prefix, "partitions": 2},
                       redis={"url": redis_url, "key_prefix": prefix}, state={"backend": "redis"},
                       deferral={"mu": 0.3})


class Pipeline:
    """The workers as processes; the learner can be restarted with its own environment."""

    def __init__(self, config: CascadeConfig, run_dir: Path) -> None:
        self.config_path, secrets = write_worker_config(config, run_dir)
        self.env = {**os.environ, **secrets, "CASCADE_CONFIG": str(self.config_path)}
        self.run_dir = run_dir
        commands = worker_commands(self.config_path, [t.name for t in config.tiers], free_port())
        self.commands = dict(commands)
        self.procs = {role: self._start(role) for role in self.commands if role != "learner"}
        self.learner_runs = 0

    def _start(self, role: str, **env: str) -> subprocess.Popen[bytes]:
        logf = (self.run_dir / f"{role}.log").open("ab")
        cmd = [*self.commands[role], *(["--publish-every", "200", "--publish-interval", "2"] if role == "learner" else [])]
        return subprocess.Popen(cmd, stdout=logf, stderr=logf, env={**self.env, **env})

    def start_learner(self, **env: str) -> subprocess.Popen[bytes]:
        self.learner_runs += 1
        self.procs["learner"] = self._start("learner", **env)
        return self.procs["learner"]

    def stop(self) -> None:
        stop_workers(list(self.procs.values()))


def count_records(config: CascadeConfig, topic: str) -> int:
    consumer = KafkaConsumer(topic, bootstrap_servers=config.kafka.bootstrap_servers, group_id=None,
                             auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=3000)
    try:
        return sum(1 for _ in consumer)
    finally:
        consumer.close()


def learned(config: CascadeConfig) -> tuple[int, int, int]:
    """(offsets the current set includes, its step's demonstrations, its logistic tier's version)."""
    tier_name, _ = model_names(config.tiers[0].name)
    store = make_state(config)
    try:
        loaded = store.load_set([tier_name])
    finally:
        store.close()
    if loaded.set is None or loaded.set.step is None or tier_name not in loaded.models:
        return 0, 0, 0
    tier = build_stages(config)[0].tier
    tier.restore(loaded.models[tier_name][1])
    return sum(loaded.set.step.offsets.values()), loaded.set.step.demonstrations, tier.version


def run(scenario: str, rows: list[LabelledEvent], bootstrap: str, redis_handle: RedisHandle, run_dir: Path,
        rate: float) -> dict[str, object]:
    config = config_for(bootstrap, redis_handle.url, rows)
    ensure_topics(config.kafka, Topics(config).all(), 2)
    run_dir.mkdir(parents=True, exist_ok=True)
    pipe = Pipeline(config, run_dir)
    kills = 0
    try:
        learner = pipe.start_learner(**({KILL_AFTER_PUBLISH_ENV: "1"} if scenario == "kill-after-publish" else {}))
        feeder = threading.Thread(target=produce_events, args=(config, rows, rate), daemon=True)
        feeder.start()
        if scenario == "kill-after-publish":
            while kills < 3:  # the supervisor: restart at once, with the hook for the first three runs
                code = learner.wait(300)
                assert code == 9, f"learner exited with {code}"
                kills += 1
                learner = pipe.start_learner(**({KILL_AFTER_PUBLISH_ENV: "1"} if kills < 3 else {}))
        elif scenario == "redis-away-at-learner-start":
            deadline = time.monotonic() + 120
            while learned(config)[1] < len(rows) // 3:  # mid-stream, with sets published
                assert time.monotonic() < deadline, "the learner published nothing"
                time.sleep(0.5)
            stop_workers([learner])
            client = redis.Redis.from_url(redis_handle.url)
            client.save()
            client.close()
            redis_handle.stop()
            learner = pipe.start_learner()
            time.sleep(8)
            assert learner.poll() is None, "the learner exited while Redis was away"
            redis_handle.restart()
        decisions = collect_decisions(config, {r.event.id for r in rows}, timeout_s=600, progress=False)
        feeder.join()
        deadline = time.monotonic() + 120
        demos = count_records(config, Topics(config).demonstrations)
        while learned(config)[0] < demos and time.monotonic() < deadline:
            time.sleep(1)
        included, step_demos, tier_version = learned(config)
    finally:
        pipe.stop()
    return {
        "fault": scenario, "events": len(rows), "decided": len(decisions),
        "duplicate decisions": sum(len(ds) - 1 for ds in decisions.values()),
        "demonstrations": demos, "learned (set step)": step_demos, "learned (tier version)": tier_version,
        "learned twice": tier_version - demos, "not learned": demos - included, "learner runs": pipe.learner_runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/isear.jsonl.gz"))
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=200.0, help="events per second fed")
    ap.add_argument("--scenario", action="append", choices=["none", "kill-after-publish", "redis-away-at-learner-start"])
    ap.add_argument("--run-dir", type=Path, default=Path("/tmp/cascade-learner-faults"))
    args = ap.parse_args()
    rows = read_stream(args.data, shuffle_seed=0, limit=args.events)
    scenarios = args.scenario or ["none", "kill-after-publish", "redis-away-at-learner-start"]
    tansu = start_tansu(None, run_dir=args.run_dir)
    redis_handle = start_redis(run_dir=args.run_dir)
    results = []
    try:
        for s in scenarios:
            results.append(run(s, rows, tansu.bootstrap_servers, redis_handle, args.run_dir / s, args.rate))
            print(results[-1], flush=True)
    finally:
        redis_handle.stop()
        tansu.stop()
    cols = list(results[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
