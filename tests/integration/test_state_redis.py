"""The state layer against a real Redis (and the same behaviour from MemoryState).

Behavioural tests run on both implementations through the ``make_store`` fixture; tests of
what only a shared store can do (several clients, processes, an outage) use Redis only.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from cascade.config import BudgetConfig, RedisConfig, StateConfig
from cascade.messages import Decision, LiveParams, RoutingSnapshot
from cascade.state import BudgetLimit, BudgetRequest, MemoryState, StateStore, StateUnavailable
from cascade.state.keys import NO_MARK
from cascade.state.redis_store import RedisState
from devtools.services import RedisHandle

pytestmark = pytest.mark.integration

# A window far longer than the test: no window boundary can split the count.
FOREVER = 10**9
StoreFactory = Callable[..., StateStore]


def decision(event_id: str = "e1") -> Decision:
    return Decision(event_id=event_id, label="joy", tier="llm", confidence=1.0, reason="llm", model_versions={"t": 3})


def redis_store(url: str, prefix: str, state: StateConfig | None = None, budget: BudgetConfig | None = None,
                **kw: Any) -> RedisState:  # fmt: skip
    return RedisState(RedisConfig(url=url, key_prefix=prefix, socket_timeout_s=0.5), state, budget, **kw)


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix private to one test; its keys are deleted afterwards."""
    p = f"test:{uuid.uuid4().hex[:10]}:"
    yield p
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"{p}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest, redis_url: str, prefix: str) -> Iterator[StoreFactory]:
    """Builds stores of one kind; Redis stores built by one test share its prefix (= its data)."""
    made: list[StateStore] = []

    def make(state: StateConfig | None = None, budget: BudgetConfig | None = None) -> StateStore:
        if request.param == "memory":
            s: StateStore = MemoryState(state, budget)
        else:
            s = redis_store(redis_url, prefix, state, budget)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def eventually(check: Callable[[], Any], timeout_s: float, step_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result or time.monotonic() >= deadline:
            return result
        time.sleep(step_s)


# ---------------------------------------------------------------------------------- both


def test_cache_and_idempotency_ttls_expire(make_store: StoreFactory) -> None:
    s = make_store()
    s.put_decisions([("short", decision("e1"))], ttl_s=1)
    s.put_decisions([("long", decision("e2"))])
    assert s.claim_events(["ev-short"], ttl_s=1) == [True]
    assert s.claim_events(["ev-long"]) == [True]
    hit = s.get_decisions(["short", "missing"], ["new", "x"])
    assert hit[0] is not None and hit[0].reason == "cache" and hit[0].event_id == "new" and hit[1] is None
    assert hit[0].model_versions == {"t": 3}
    time.sleep(1.1)
    assert [d is not None for d in s.get_decisions(["short", "long"])] == [False, True]
    assert s.seen(["ev-short", "ev-long"]) == [False, True]
    assert s.claim_events(["ev-short", "ev-long"], ttl_s=1) == [True, False]


def test_budget_is_exact_under_thread_concurrency(make_store: StoreFactory) -> None:
    s = make_store()
    limits = [BudgetLimit(name="calls_per_test", metric="calls", seconds=FOREVER, limit=500)]
    start = threading.Barrier(8)
    allowed = [0] * 8
    reasons: set[str | None] = set()

    def hammer(i: int) -> None:
        start.wait()
        for j in range(25):
            if i % 2:  # half the threads take one at a time, half in batches
                takes = [s.take_budget("shared", limits=limits) for _ in range(4)]
            else:
                takes = s.take_budgets([BudgetRequest("shared")] * 4, limits)
            allowed[i] += sum(t.allowed for t in takes)
            reasons.update(t.reason for t in takes if not t.allowed)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 500  # 800 attempts, exactly the limit allowed
    assert reasons == {"calls_per_test"}
    assert s.budget_remaining("shared", limits) == {"calls_per_test": 0}
    assert s.stats["budget_allowed"] == 500 and s.stats["budget_denied"] == 300


def test_budget_windows_all_or_nothing_and_rollover(make_store: StoreFactory) -> None:
    s = make_store(budget=BudgetConfig(calls_per_day=10**6, money_per_day=1.0, pace=False))
    assert s.take_budget("t", money=0.75).allowed
    t = s.take_budget("t", money=0.5)
    assert not t.allowed and t.reason == "money_per_day"
    # The refused take counted in no window.
    assert s.budget_remaining("t") == {"calls_per_day": 10**6 - 1, "money_per_day": pytest.approx(0.25)}
    s.charge("t", tokens=10, money=0.25)
    assert s.take_budget("t").reason == "money_per_day"  # exhausted: even a zero-money call waits
    # A one-second window (windows align to the epoch; Redis and the test share the clock).
    lims = [BudgetLimit(name="per_second", metric="calls", seconds=1, limit=2)]
    sleep_to_next_second()
    assert [s.take_budget("r", limits=lims).allowed for _ in range(3)] == [True, True, False]
    sleep_to_next_second()
    assert s.take_budget("r", limits=lims).allowed


def test_paced_budget_refuses_a_burst_at_the_start_of_a_window(make_store: StoreFactory) -> None:
    """The script's pacing agrees with BudgetLimit.paced_cap: a burst just after a window starts
    gets its share of the window so far plus the burst, not the whole window."""
    s = make_store()
    paced = [BudgetLimit(name="paced", metric="calls", seconds=4, limit=400, paced=True)]
    hard = [BudgetLimit(name="hard", metric="calls", seconds=4, limit=400)]
    time.sleep(4.02 - time.time() % 4.0)  # just after a 4-second boundary
    allowed = sum(t.allowed for t in s.take_budgets([BudgetRequest("p")] * 400, limits=paced))
    cap = paced[0].paced_cap(time.time() % 4.0)  # the window's cap after the script ran
    assert 1 <= allowed <= cap + 1e-9 < 400
    assert all(t.allowed for t in s.take_budgets([BudgetRequest("h")] * 400, limits=hard))


def sleep_to_next_second() -> None:
    time.sleep(1.05 - time.time() % 1.0)


def test_registry_publish_fetch_keep_k_rollback(make_store: StoreFactory) -> None:
    s = make_store(state=StateConfig(registry_keep=3))
    assert s.fetch("logistic") is None and s.latest_version("logistic") is None
    blobs = {v: bytes([v]) * (1000 * v) for v in range(1, 6)}
    for v, b in blobs.items():
        s.publish("logistic", v, b)
    s.publish("policy", 42, b"\x00\xffpolicy")
    assert s.current_versions() == {"logistic": 5, "policy": 42}
    assert s.current_versions(["policy", "nope"]) == {"policy": 42}
    assert [e.version for e in s.versions("logistic")] == [3, 4, 5]
    assert s.versions("logistic")[0].size == 3000
    assert s.fetch("logistic") == (5, blobs[5]) and s.fetch("logistic", 3) == (3, blobs[3])
    assert s.fetch("logistic", 2) is None  # trimmed
    assert s.fetch("policy") == (42, b"\x00\xffpolicy")
    s.rollback("logistic", 3)
    assert s.latest_version("logistic") == 3 and s.fetch("logistic") == (3, blobs[3])
    with pytest.raises(KeyError):
        s.rollback("logistic", 1)
    s.publish("logistic", 6, b"six")
    assert [e.version for e in s.versions("logistic")] == [4, 5, 6] and s.fetch("logistic") == (6, b"six")


def test_watcher_reports_publish_and_rollback(make_store: StoreFactory) -> None:
    s = make_store()
    s.publish("m", 1, b"a")
    w = s.watcher(poll_interval_s=30.0)  # only notices can wake it in this test
    assert w.changed() == {"m": 1}
    seen: list[tuple[str, int]] = []
    unsubscribe = s.subscribe(lambda n, v: seen.append((n, v)))
    time.sleep(0.3)  # Redis: the subscription thread is subscribed
    s.publish("m", 2, b"b")
    assert w.wait(1.0) == {"m": 2}
    s.rollback("m", 1)
    assert w.wait(1.0) == {"m": 1}
    assert eventually(lambda: seen == [("m", 2), ("m", 1)], 1.0)
    unsubscribe()
    w.close()


def test_live_params_round_trip(make_store: StoreFactory) -> None:
    s = make_store()
    assert s.get_live_params() is None
    p = LiveParams(mu=0.25, thresholds={"logistic": 0.7, "onnx": 0.9}, exploration_scale=0.1)
    s.set_live_params(p)
    assert s.get_live_params() == p
    s.set_live_params(p.model_copy(update={"mu": 2.0}))
    assert s.get_live_params().mu == 2.0  # type: ignore[union-attr]


def test_routing_snapshots_are_shared_per_tier(make_store: StoreFactory) -> None:
    writer, reader = make_store(), make_store()
    if isinstance(writer, MemoryState):
        reader = writer  # one process shares one store
    assert reader.get_routing() == {}
    a = RoutingSnapshot(tier="logistic", cost=1.0, answer_rate=0.4, answered_disagreement=0.1, seen=10)
    b = RoutingSnapshot(tier="onnx", cost=5.0, answer_rate=0.7, answered_disagreement=0.2, seen=6)
    writer.put_routing(a)
    writer.put_routing(b)
    writer.put_routing(a.model_copy(update={"answer_rate": 0.5}))
    assert reader.get_routing() == {"logistic": a.model_copy(update={"answer_rate": 0.5}), "onnx": b}


def test_idempotency_claims_and_release(make_store: StoreFactory) -> None:
    s = make_store()
    assert s.claim_events(["a", "b", "c"]) == [True, True, True]
    assert s.claim_events(["c", "d"]) == [False, True]
    s.release_events(["c"])
    assert s.seen(["a", "c", "d", "z"]) == [True, False, True, False]
    assert s.claim_events(["c"]) == [True]
    # Both reads a worker makes before deciding, at once: the same answers as separately.
    s.put_decisions([("k1", decision("e1"))])
    seen, hits = s.seen_and_decisions(["a", "z"], ["k1", "k2"])
    assert seen == [True, False] and hits[0] is not None and hits[0].event_id == "a" and hits[1] is None
    assert hits == s.get_decisions(["k1", "k2"], ["a", "z"])
    # The idempotency record keeps what each id was claimed with: a mark of its text, or NO_MARK.
    assert s.claim_events(["m1", "m2", "a"], marks=["t1", "t2", "t3"]) == [True, True, False]
    assert s.marks(["m1", "m2", "a", "z"]) == ["t1", "t2", NO_MARK, None]
    marks, hits = s.marks_and_decisions(["m1", "z"], ["k1", "k2"])
    assert marks == ["t1", None] and hits[0] is not None and hits[1] is None
    assert s.seen_and_decisions([], []) == ([], [])


# ---------------------------------------------------------------------------------- Redis only


def test_two_clients_share_claims_cache_and_params(redis_url: str, prefix: str) -> None:
    with redis_store(redis_url, prefix) as a, redis_store(redis_url, prefix) as b:
        assert a.claim_events(["x", "y"]) == [True, True]
        assert b.claim_events(["y", "z"]) == [False, True]
        assert a.claim_events(["z"]) == [False]
        b.release_events(["y"])
        assert a.claim_events(["y"]) == [True]
        a.put_decisions([("k", decision())])
        assert b.get_decisions(["k"])[0] is not None
        a.set_live_params(LiveParams(mu=0.5))
        assert b.get_live_params() == a.get_live_params()


def test_watcher_sees_a_version_published_by_another_client(redis_url: str, prefix: str) -> None:
    with redis_store(redis_url, prefix) as worker, redis_store(redis_url, prefix) as learner:
        learner.publish("logistic", 1, b"v1")
        # A worker that starts later sees the current version from the version key (no notice needed).
        watcher = worker.watcher(["logistic"], poll_interval_s=30.0)
        assert watcher.changed() == {"logistic": 1}
        time.sleep(0.3)  # let the subscription connect
        t0 = time.monotonic()
        learner.publish("logistic", 2, b"v2")
        learner.publish("other", 1, b"ignored")
        got = watcher.wait(1.0)
        assert got == {"logistic": 2} and time.monotonic() - t0 < 1.0
        assert worker.fetch("logistic", got["logistic"]) == (2, b"v2")
        watcher.close()


def _take_in_process(url: str, prefix: str, attempts: int, start: Any, results: Any) -> None:
    limits = [BudgetLimit(name="calls_per_test", metric="calls", seconds=FOREVER, limit=500)]
    with redis_store(url, prefix) as s:
        s.ping()  # connected before the race starts
        start.wait()
        results.put(sum(s.take_budget("shared", limits=limits).allowed for _ in range(attempts)))


def test_budget_is_exact_across_processes(redis_url: str, prefix: str) -> None:
    ctx = multiprocessing.get_context("fork")  # the children build their own clients
    start, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_take_in_process, args=(redis_url, prefix, 250, start, results)) for _ in range(4)]
    for p in procs:
        p.start()
    allowed = [results.get(timeout=20) for _ in procs]
    for p in procs:
        p.join(timeout=5)
    assert sum(allowed) == 500, allowed  # 1000 attempts, exactly the limit allowed
    assert all(a > 0 for a in allowed), allowed  # they really competed


@pytest.mark.parametrize("fail_closed", [False, True])
def test_outage_degrades_counts_and_recovers(private_redis: RedisHandle, fail_closed: bool) -> None:
    budget = BudgetConfig(calls_per_minute=100, fail_closed=fail_closed)
    s = redis_store(private_redis.url, "out:", budget=budget, backoff_base_s=0.05, backoff_cap_s=0.4)
    other = redis_store(private_redis.url, "out:")
    try:
        s.put_decisions([("k", decision())])
        assert s.get_decisions(["k"])[0] is not None and s.take_budget().allowed
        s.publish("m", 1, b"one")
        watcher = s.watcher(poll_interval_s=30.0)
        assert watcher.changed() == {"m": 1}

        private_redis.stop()
        assert s.get_decisions(["k"]) == [None]  # a miss, not an exception
        t = s.take_budget()
        if fail_closed:
            assert (t.allowed, t.reason) == (False, "budget_store_unreachable")
        else:
            assert (t.allowed, t.reason) == (True, "budget_store_unreachable_fail_open")
        assert s.put_decisions([("k2", decision())]) == 1  # dropped quietly
        assert s.claim_events(["e"]) == [True]  # keep answering
        assert s.seen(["e"]) == [False] and s.get_live_params() is None and s.fetch("m") is None
        assert s.seen_and_decisions(["e"], ["k"]) == ([False], [None])
        assert watcher.changed() == {}
        s.charge(tokens=5)
        with pytest.raises(StateUnavailable):
            s.publish("m", 2, b"two")
        assert not s.available and s.outages == 1
        # Within the backoff window calls are skipped, not sent: fast, and still counted.
        t0 = time.monotonic()
        for _ in range(200):
            s.get_decisions(["k"])
        assert time.monotonic() - t0 < 0.5
        assert s.errors["get_decisions"] >= 201 and s.errors["take_budget"] >= 1
        assert s.outages == 1  # one outage, however many failed calls

        private_redis.restart()  # an empty server: the data is gone, the service is back
        assert eventually(lambda: s.claim_events(["after"]) == [True] and s.available, 3.0)
        assert s.take_budget().reason is None and s.outages == 1
        s.put_decisions([("k3", decision())])
        assert s.get_decisions(["k3"])[0] is not None
        # The subscription reconnects too: a new version reaches the watcher.
        time.sleep(0.5)
        other.publish("m", 3, b"three")
        assert watcher.wait(3.0) == {"m": 3}
        watcher.close()
    finally:
        s.close()
        other.close()
