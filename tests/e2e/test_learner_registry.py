"""The learner as a process on a real Tansu broker and a real Redis: killed between a publish and
its commit, and started while its Redis is away. Each demonstration is learned exactly once,
and the registry never steps down.

The count of demonstrations learned comes from two places that the learner cannot fake
together: the set's ``LearnerStep`` and the logistic tier's version inside the published
snapshot (the number of demonstrations that model learned).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from cascade.config import CascadeConfig, load_config
from cascade.learning.registry import model_names
from cascade.messages import Demonstration
from cascade.routing.build import build_stages
from cascade.state import RegistrySet, make_state
from devtools.services import RedisHandle, free_port
from workers.kafka_io import OutRecord, ensure_topics, make_producer, produce_and_flush
from workers.learner_worker import KILL_AFTER_PUBLISH_ENV
from workers.run import write_worker_config
from workers.topics import Topics

pytestmark = pytest.mark.e2e
LLM = "test-llm"
WORDS = {"joy": ["happy", "glad"], "fear": ["afraid", "scared"], "anger": ["furious", "angry"]}
TIER, _ = model_names("logistic")


def learner_config(kafka_bootstrap: str, redis_url: str) -> CascadeConfig:
    prefix = f"l{uuid.uuid4().hex[:8]}."
    config = load_config(None, task={"labels": sorted(WORDS)}, llm={"name": LLM},
                         kafka={"bootstrap_servers": kafka_bootstrap, "topic_prefix": prefix, "partitions": 2},
                         redis={"url": redis_url, "key_prefix": prefix}, state={"backend": "redis"},
                         deferral={"warmup": 50, "mu": 0.3})
    ensure_topics(kafka_bootstrap, Topics(config).all(), 2)
    return config


def produce_demonstrations(config: CascadeConfig, start: int, n: int) -> None:
    labels = sorted(WORDS)
    records = []
    for i in range(start, start + n):
        label = labels[i % len(labels)]
        demo = Demonstration(event_id=f"e{i}", text=f"event {i} we felt {WORDS[label][i % 2]} about it", llm=LLM,
                             llm_label=label)
        records.append(OutRecord(Topics(config).demonstrations, demo.event_id.encode(), demo.model_dump_json().encode()))
    producer = make_producer(config.kafka)
    try:
        produce_and_flush(producer, records)
    finally:
        producer.close()


def start_learner(config: CascadeConfig, run_dir: Path, log_name: str, **env: str) -> subprocess.Popen[bytes]:
    config_path, secrets = write_worker_config(config, run_dir)
    cmd = [sys.executable, "-m", "workers.cli", "--config", str(config_path), "learner",
           "--metrics-port", str(free_port()), "--publish-every", "150", "--publish-interval", "1"]
    logf = (run_dir / log_name).open("ab")
    return subprocess.Popen(cmd, stdout=logf, stderr=logf, env={**os.environ, **secrets, **env})


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def current_set(config: CascadeConfig) -> tuple[RegistrySet | None, int | None]:
    """The registry's current set and the demonstrations its logistic tier learned (its version)."""
    store = make_state(config)
    try:
        loaded = store.load_set([TIER])
    finally:
        store.close()
    if TIER not in loaded.models:
        return loaded.set, None
    tier = build_stages(config)[0].tier
    tier.restore(loaded.models[TIER][1])
    return loaded.set, tier.version


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def learned(config: CascadeConfig, n: int) -> bool:
    found, _ = current_set(config)
    return found is not None and found.step is not None and sum(found.step.offsets.values()) >= n


def test_a_learner_killed_between_publish_and_commit_learns_nothing_twice(kafka_bootstrap, redis_url, tmp_path):
    config = learner_config(kafka_bootstrap, redis_url)
    n = 900
    produce_demonstrations(config, 0, n)
    first = start_learner(config, tmp_path, "learner-killed.log", **{KILL_AFTER_PUBLISH_ENV: "1"})
    try:
        assert first.wait(120) == 9  # the hook: gone right after the first publish, before its commit
        killed_at, _ = current_set(config)
        assert killed_at is not None and killed_at.step is not None
        assert 0 < killed_at.step.demonstrations < n
        restarted = start_learner(config, tmp_path, "learner-restarted.log")
        wait_for(lambda: learned(config, n), 120, "every demonstration in the registry")
        assert stop(restarted) == 0
    finally:
        stop(first)
    final, tier_version = current_set(config)
    assert final is not None and final.step is not None
    # Nothing learned twice: the Kafka commit never happened, so the restart re-read every
    # demonstration the first set included, and skipped them.
    assert final.step.demonstrations == tier_version == n
    assert final.version > killed_at.version
    skipped = (tmp_path / "learner-restarted.log").read_text().count("already_learned_skipped")
    assert skipped > 0
    print(f"\nFAULT kill-9-between-publish-and-commit: demonstrations={n} learned={tier_version} "
          f"duplicates={tier_version - n} first_set={killed_at.step.demonstrations}")


def test_a_learner_started_while_redis_is_away_waits_and_resumes(kafka_bootstrap, private_redis: RedisHandle,
                                                                 tmp_path):
    config = learner_config(kafka_bootstrap, private_redis.url)
    produce_demonstrations(config, 0, 600)
    learner = start_learner(config, tmp_path, "learner-1.log")
    try:
        wait_for(lambda: learned(config, 600), 120, "the first 600 demonstrations")
        assert stop(learner) == 0
        before, before_tier = current_set(config)
        assert before is not None and before_tier == 600
        client = redis.Redis.from_url(private_redis.url)
        client.save()  # persisted, so the registry comes back with the server
        client.close()
        private_redis.stop()

        produce_demonstrations(config, 600, 300)
        learner = start_learner(config, tmp_path, "learner-2.log")
        time.sleep(8)
        assert learner.poll() is None  # alive, waiting, and (Redis being away) nothing published
        assert "waiting_for_registry" in (tmp_path / "learner-2.log").read_text()
        private_redis.restart()
        wait_for(lambda: learned(config, 900), 120, "all 900 demonstrations")
        assert stop(learner) == 0
    finally:
        stop(learner)
    after, after_tier = current_set(config)
    assert after is not None and after.step is not None
    # Resumed from the registry: an untrained learner would have published a tier of 300.
    assert after.step.demonstrations == after_tier == 900
    assert after.version > before.version and after.epoch == before.epoch
    print(f"\nFAULT learner-started-while-redis-away: demonstrations=900 learned={after_tier} "
          f"duplicates={after_tier - 900} version {before.version} -> {after.version}")


def test_a_running_learner_outlives_redis_restarting_empty_and_never_steps_down(kafka_bootstrap,
                                                                              private_redis: RedisHandle, tmp_path):
    config = learner_config(kafka_bootstrap, private_redis.url)
    produce_demonstrations(config, 0, 600)
    learner = start_learner(config, tmp_path, "learner.log")
    try:
        wait_for(lambda: learned(config, 600), 120, "the first 600 demonstrations")
        before, _ = current_set(config)
        assert before is not None
        private_redis.stop()  # persistence off: it comes back empty
        produce_demonstrations(config, 600, 300)
        time.sleep(5)  # learning on, every publish failing
        assert learner.poll() is None
        private_redis.restart()
        wait_for(lambda: learned(config, 900), 120, "all 900 demonstrations on the emptied registry")
        assert learner.poll() is None
        assert stop(learner) == 0
    finally:
        stop(learner)
    after, after_tier = current_set(config)
    assert after is not None and after.step is not None
    # Republished whole (not only what came after the restart), above every version served before.
    assert after.step.demonstrations == after_tier == 900
    assert after.version > before.version
    text = (tmp_path / "learner.log").read_text()
    assert "publish_deferred" in text and "registry_emptied_republishing" in text
    print(f"\nFAULT redis-restarted-empty-under-learner: demonstrations=900 learned={after_tier} "
          f"duplicates={after_tier - 900} version {before.version} -> {after.version}")
