"""The registry's sets against a real Redis (and the same semantics from MemoryState): a tier and
its policy published together, versions that only grow, stale publishers refused, an operator's
rollback, and watchers that never step down on their own.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis

from cascade.config import StateConfig
from cascade.state import LearnerStep, StaleVersion, StateStore
from devtools.services import RedisHandle
from tests.integration import test_state_redis as state_tests
from tests.integration.test_state_redis import StoreFactory, redis_store

pytestmark = pytest.mark.integration

# The state tests' fixtures: both stores for the shared semantics, a private key prefix in Redis.
make_store = state_tests.make_store
prefix = state_tests.prefix

TIER, POLICY = "tier:logistic", "policy:logistic"


def step(offsets: dict[int, int], demonstrations: int) -> LearnerStep:
    return LearnerStep(topic="demonstrations", offsets=offsets, demonstrations=demonstrations)


def publish(s: StateStore, tag: str, base: tuple[int, int], st: LearnerStep | None = None, min_version: int = 0) -> int:
    models = {TIER: f"tier-{tag}".encode(), POLICY: f"policy-{tag}".encode()}
    return s.publish_set(models, st, base_epoch=base[0], base_version=base[1], min_version=min_version).version


def test_a_set_is_published_and_loaded_together_with_its_step(make_store: StoreFactory) -> None:
    s = make_store()
    empty = s.load_set([TIER, POLICY])
    assert (empty.epoch, empty.version, empty.set, empty.models) == (0, 0, None, {})
    assert publish(s, "a", (0, 0), step({0: 10, 1: 7}, 17)) == 1
    assert publish(s, "b", (0, 1), step({0: 12, 1: 9}, 21)) == 2
    loaded = s.load_set([TIER, POLICY, "tier:absent"])
    assert (loaded.epoch, loaded.version) == (0, 2)
    assert loaded.models == {TIER: (2, b"tier-b"), POLICY: (2, b"policy-b")}
    assert loaded.set is not None and loaded.set.step == step({0: 12, 1: 9}, 21)
    assert loaded.set.names == [TIER, POLICY]
    assert [(x.version, x.step.demonstrations if x.step else None) for x in s.registry_sets()] == [(1, 17), (2, 21)]
    assert [e.version for e in s.versions(TIER)] == [1, 2] and s.versions(TIER)[1].size == len(b"tier-b")
    assert s.registry_head() == (0, {TIER: 2, POLICY: 2})
    s.publish_set({TIER: b"t3", POLICY: b"p3"}, None, base_epoch=0, base_version=2, publisher="learner-a")
    third = s.load_set([]).set
    assert third is not None and (third.version, third.publisher, third.step) == (3, "learner-a", None)


def test_a_stale_publisher_is_refused_and_writes_nothing(make_store: StoreFactory) -> None:
    s = make_store()
    publish(s, "a", (0, 0))
    publish(s, "b", (0, 1))
    # A learner that started from scratch (base 0) or still believes set 1 is current.
    for base in [(0, 0), (0, 1), (1, 2)]:
        with pytest.raises(StaleVersion) as refused:
            publish(s, "stale", base)
        assert (refused.value.epoch, refused.value.version) == (0, 2)
    assert s.fetch(TIER) == (2, b"tier-b") and s.fetch(POLICY) == (2, b"policy-b")
    assert [x.version for x in s.registry_sets()] == [1, 2]
    assert publish(s, "c", (0, 2)) == 3  # a refused publish took no version


def test_versions_only_grow_above_what_was_published_before(make_store: StoreFactory) -> None:
    s = make_store()
    s.publish(TIER, 1135, b"old")  # a version published one model at a time, before sets existed
    assert publish(s, "a", (0, 0)) == 1136
    # A publisher that had seen version 2000 before the store lost its data keeps going up.
    assert publish(s, "b", (0, 1136), min_version=2001) == 2001
    assert publish(s, "c", (0, 2001)) == 2002


def test_rollback_steps_down_with_a_new_epoch(make_store: StoreFactory) -> None:
    s = make_store(state=StateConfig(registry_keep=3))
    for i in range(4):
        publish(s, str(i), (0, i), step({0: 10 * (i + 1)}, 10 * (i + 1)))
    assert [x.version for x in s.registry_sets()] == [2, 3, 4]  # the newest 3 kept
    epoch, back = s.rollback_set()  # default: the set before the current one
    assert (epoch, back.version) == (1, 3) and back.step == step({0: 30}, 30)
    loaded = s.load_set([TIER, POLICY])
    assert (loaded.epoch, loaded.version) == (1, 3) and loaded.models[TIER] == (3, b"tier-2")
    assert loaded.models[POLICY] == (3, b"policy-2")
    with pytest.raises(StaleVersion):  # the learner still based on set 4 must reload
        publish(s, "x", (0, 4))
    assert publish(s, "after", (1, 3)) == 5  # never reuses version 4
    assert s.rollback_set(4)[0] == 2  # a set stepped away from stays kept, and can be current again
    assert s.load_set([TIER]).models[TIER] == (4, b"tier-3")
    with pytest.raises(KeyError):
        s.rollback_set(2)  # trimmed by the publish of 5
    with pytest.raises(KeyError):
        s.rollback_set(99)


def test_a_watcher_never_steps_down_unless_rolled_back(make_store: StoreFactory) -> None:
    s = make_store()
    publish(s, "a", (0, 0))
    publish(s, "b", (0, 1))
    w = s.watcher([TIER, POLICY], poll_interval_s=0.0)
    assert w.changed() == {TIER: 2, POLICY: 2}
    s.publish(TIER, 1, b"untrained")  # a lower version made current by a stale writer
    assert w.changed() == {}
    publish(s, "c", (0, 2))
    assert w.changed() == {TIER: 3, POLICY: 3}
    s.rollback_set(2)  # the operator's step down is followed
    assert w.changed() == {TIER: 2, POLICY: 2}
    w.close()


# ---------------------------------------------------------------------------------- Redis only


def test_concurrent_publishers_never_split_a_set(redis_url: str, prefix: str) -> None:
    """Publishers racing (each reloads on StaleVersion) and readers loading meanwhile: every kept
    version holds one publisher's tier and policy, versions are distinct, no reader saw a mix."""
    stores = [redis_store(redis_url, prefix, StateConfig(registry_keep=1000)) for _ in range(4)]
    wins: list[list[int]] = [[] for _ in range(3)]
    mixed: list[tuple[bytes, bytes]] = []
    stop = threading.Event()

    def publisher(i: int) -> None:
        s = stores[i]
        for n in range(40):
            while True:
                head = s.load_set([TIER])
                try:
                    wins[i].append(publish(s, f"{i}-{n}", (head.epoch, head.version)))
                    break
                except StaleVersion:
                    continue

    def reader() -> None:
        while not stop.is_set():
            got = stores[3].load_set([TIER, POLICY]).models
            if got and got[TIER][1].removeprefix(b"tier-") != got[POLICY][1].removeprefix(b"policy-"):
                mixed.append((got[TIER][1], got[POLICY][1]))

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(3)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stop.set()
    r.join(timeout=5)
    try:
        versions = sorted(v for w in wins for v in w)
        assert versions == list(range(1, 121))  # 120 publishes, each its own version, no gaps
        assert mixed == []
        for v in versions:
            tier, policy = stores[3].fetch(TIER, v), stores[3].fetch(POLICY, v)
            assert tier is not None and policy is not None
            assert tier[1].removeprefix(b"tier-") == policy[1].removeprefix(b"policy-")
    finally:
        for s in stores:
            s.close()


def test_versions_keep_growing_after_redis_restarts_empty(private_redis: RedisHandle) -> None:
    s = redis_store(private_redis.url, "empty:", backoff_base_s=0.05, backoff_cap_s=0.2)
    try:
        for i in range(5):
            publish(s, str(i), (0, i))
        w = s.watcher([TIER], poll_interval_s=0.0)
        assert w.changed() == {TIER: 5}
        private_redis.restart()  # persistence off: the registry is gone
        deadline = time.monotonic() + 5
        while True:  # the learner's view: its base is gone, so it rebases and publishes above
            try:
                head = s.load_set([TIER])
                break
            except Exception:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert (head.epoch, head.version) == (0, 0)
        with pytest.raises(StaleVersion):
            publish(s, "untrained", (0, 5))
        assert w.changed() == {}
        assert publish(s, "kept", (0, 0), min_version=6) == 6
        assert w.changed() == {TIER: 6}
        w.close()
    finally:
        s.close()


def test_a_set_survives_a_redis_restart_with_its_data(private_redis: RedisHandle) -> None:
    """What the e2e learner test relies on: SAVE then restart brings the registry back whole."""
    s = redis_store(private_redis.url, "saved:")
    try:
        publish(s, "a", (0, 0), step({0: 3}, 3))
        client = redis.Redis.from_url(private_redis.url)
        client.save()
        client.close()
        private_redis.restart()
        deadline = time.monotonic() + 5
        while True:
            try:
                loaded = s.load_set([TIER, POLICY])
                break
            except Exception:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert loaded.version == 1 and loaded.set is not None and loaded.set.step == step({0: 3}, 3)
    finally:
        s.close()
