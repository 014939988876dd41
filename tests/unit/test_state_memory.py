"""MemoryState semantics on a fake clock: cache, TTLs, budget windows, registry, idempotency."""

from __future__ import annotations

import pytest

from cascade.config import BudgetConfig, StateConfig, load_config
from cascade.messages import Decision, LiveParams
from cascade.state import (
    BudgetLimit,
    BudgetRequest,
    MemoryState,
    cache_key,
    cache_keys,
    limits_from_config,
    make_state,
    normalize_text,
)


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def decision(event_id: str = "e1", reason: str = "llm", tier: str = "llm", label: str | None = "joy") -> Decision:
    return Decision(event_id=event_id, label=label, tier=tier, confidence=0.9, reason=reason,  # type: ignore[arg-type]
                    model_versions={"logistic": 7})  # fmt: skip


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_normalize_text_nfkc_casefold_whitespace() -> None:
    assert normalize_text("  Ｈｅｌｌｏ\t\nWORLD  ") == "hello world"
    assert normalize_text("ﬁne STRASSE") == normalize_text("fine  straße")


def test_cache_key_identity() -> None:
    k = cache_key("isear", ["joy", "fear"], "I was  Happy")
    assert k == cache_key("isear", ["fear", "joy"], "i was happy\n")  # label order and spacing do not matter
    assert k != cache_key("other", ["joy", "fear"], "I was happy")
    assert k != cache_key("isear", ["joy", "fear", "anger"], "I was happy")
    assert k != cache_key("isear", ["joy", "fear"], "I was sad")
    # Separators keep (task, labels) boundaries apart.
    assert cache_key("a", ["b c"], "t") != cache_key("a", ["b", "c"], "t")
    # Pinned: a change would orphan every cached decision; bump CACHE_KEY_VERSION instead.
    assert k == "86fbb5670b31c17236849f24dbd2d65f"
    texts = ["I was  Happy", "I was sad", "", "x\ud800y"]
    assert cache_keys("isear", ["joy", "fear"], texts) == [cache_key("isear", ["joy", "fear"], t) for t in texts]


def test_cache_hit_answers_as_cache_for_the_new_event(clock: Clock) -> None:
    s = MemoryState(clock=clock)
    assert s.put_decisions([("k1", decision("e1"))]) == 1
    hit, miss = s.get_decisions(["k1", "k2"], ["e9", "e10"])
    assert miss is None and hit is not None
    assert (hit.event_id, hit.label, hit.tier, hit.reason, hit.cost) == ("e9", "joy", "llm", "cache", 0.0)
    assert hit.model_versions == {"logistic": 7}
    assert s.get_decisions(["k1"])[0].event_id == "e1"  # type: ignore[union-attr]
    assert (s.stats["cache_hits"], s.stats["cache_misses"], s.stats["cache_puts"]) == (2, 1, 1)
    with pytest.raises(ValueError):
        s.get_decisions(["k1"], ["a", "b"])


def test_only_llm_answers_are_cached_unless_cheap_answers_enabled(clock: Clock) -> None:
    items = [
        ("llm", decision(reason="llm")),
        ("tier", decision(reason="tier", tier="logistic")),
        ("unusable", decision(reason="llm_unusable", tier="logistic")),
        ("budget", decision(reason="budget_exhausted", tier="logistic")),
        ("none", decision(reason="llm", label=None)),
    ]
    s = MemoryState(clock=clock)
    assert s.put_decisions(items) == 1
    assert [d is not None for d in s.get_decisions([k for k, _ in items])] == [True, False, False, False, False]
    cheap = MemoryState(StateConfig(cache_cheap_answers=True), clock=clock)
    assert cheap.put_decisions(items) == 2


def test_cache_ttl_expiry(clock: Clock) -> None:
    s = MemoryState(StateConfig(cache_ttl_s=60), clock=clock)
    s.put_decisions([("short", decision())], ttl_s=0.5)
    s.put_decisions([("default", decision())])
    clock.t += 0.49
    assert s.get_decisions(["short"])[0] is not None
    clock.t += 0.02
    assert s.get_decisions(["short", "default"])[0] is None
    clock.t += 60
    assert s.get_decisions(["default"]) == [None]
    with pytest.raises(ValueError):
        s.put_decisions([("x", decision())], ttl_s=0)


def test_cache_is_bounded(clock: Clock) -> None:
    s = MemoryState(max_cache_entries=3, clock=clock)
    s.put_decisions([(f"k{i}", decision(f"e{i}")) for i in range(5)])
    assert [d is not None for d in s.get_decisions([f"k{i}" for i in range(5)])] == [False, False, True, True, True]


def test_limits_from_config() -> None:
    assert limits_from_config(BudgetConfig()) == []
    lims = limits_from_config(BudgetConfig(calls_per_minute=10, tokens_per_day=1000, money_per_day=2.5))
    assert [(lim.name, lim.metric, lim.seconds, lim.limit) for lim in lims] == [
        ("calls_per_minute", "calls", 60, 10),
        ("tokens_per_day", "tokens", 86400, 1000),
        ("money_per_day", "money", 86400, 2.5),
    ]


def test_budget_unlimited_without_windows(clock: Clock) -> None:
    s = MemoryState(clock=clock)
    assert all(s.take_budget().allowed for _ in range(1000))
    assert s.budget_remaining() == {}
    with pytest.raises(ValueError):
        s.take_budget(calls=-1)


def test_paced_budget_spreads_a_window_over_it_and_leaves_little_unspent(clock: Clock) -> None:
    """Demand at twice the budget, arriving evenly: the spend follows the window's line (never
    above its share so far plus the burst), and next to nothing is left when the window ends."""
    clock.t = 3600 * 1000  # a window boundary
    s = MemoryState(budget=BudgetConfig(calls_per_hour=600), clock=clock)
    spent, worst_lead = 0, 0.0
    for i in range(1200):  # one request every 3 s
        clock.t = 3600 * 1000 + 3 * i
        spent += s.take_budget("t").allowed
        worst_lead = max(worst_lead, spent - 600 * (3 * i) / 3600)
    assert 594 <= spent <= 600  # under 1% unspent
    assert worst_lead <= 6  # the burst: 1% of the budget


def test_paced_budget_refuses_a_burst_at_the_start_of_a_window(clock: Clock) -> None:
    clock.t = 60 * 1000  # a minute boundary
    paced = MemoryState(budget=BudgetConfig(calls_per_minute=60), clock=clock)
    hard = MemoryState(budget=BudgetConfig(calls_per_minute=60, pace=False), clock=clock)
    assert sum(paced.take_budget("t").allowed for _ in range(60)) == 1
    assert sum(hard.take_budget("t").allowed for _ in range(60)) == 60
    clock.t += 30  # half the window: half the budget
    assert sum(paced.take_budget("t").allowed for _ in range(60)) == 30


def test_budget_window_limit_and_rollover(clock: Clock) -> None:
    clock.t = 60 * 1000 + 1  # just after a minute boundary
    s = MemoryState(budget=BudgetConfig(calls_per_minute=3, pace=False), clock=clock)
    takes = [s.take_budget("t") for _ in range(5)]
    assert [t.allowed for t in takes] == [True, True, True, False, False]
    assert takes[2].remaining == {"calls_per_minute": 0} and takes[3].reason == "calls_per_minute"
    assert s.take_budget("other").allowed  # tenants are independent
    clock.t += 58
    assert not s.take_budget("t").allowed
    clock.t += 1  # next minute: a fresh window
    assert s.take_budget("t").allowed
    assert s.budget_remaining("t") == {"calls_per_minute": 2}
    assert (s.stats["budget_allowed"], s.stats["budget_denied"]) == (5, 3)


def test_budget_all_or_nothing_across_windows(clock: Clock) -> None:
    s = MemoryState(budget=BudgetConfig(calls_per_minute=10, calls_per_day=2, pace=False), clock=clock)
    assert s.take_budget().allowed and s.take_budget().allowed
    denied = s.take_budget()
    assert not denied.allowed and denied.reason == "calls_per_day"
    # The minute window was not counted for the denied call.
    assert s.budget_remaining() == {"calls_per_minute": 8, "calls_per_day": 0}


def test_budget_tokens_and_money_are_charged_after_the_call(clock: Clock) -> None:
    s = MemoryState(budget=BudgetConfig(tokens_per_day=100, money_per_day=1.0, pace=False), clock=clock)
    assert s.take_budget().allowed
    s.charge(tokens=60, money=0.4)
    assert s.take_budget().allowed
    s.charge(tokens=60, money=0.1)  # overshoot by one call's usage: known only afterwards
    t = s.take_budget()
    assert not t.allowed and t.reason == "tokens_per_day"
    assert t.remaining["tokens_per_day"] == -20 and t.remaining["money_per_day"] == pytest.approx(0.5)
    # A take that brings its own estimate is refused when it would not fit.
    s2 = MemoryState(budget=BudgetConfig(money_per_day=1.0, pace=False), clock=clock)
    assert s2.take_budget(money=0.6).allowed
    assert s2.take_budget(money=0.6).reason == "money_per_day"
    assert s2.take_budget(money=0.4).allowed


def test_budget_refund_and_explicit_limits(clock: Clock) -> None:
    s = MemoryState(clock=clock)
    lims = [BudgetLimit(name="burst", metric="calls", seconds=10, limit=2)]
    assert [t.allowed for t in s.take_budgets([BudgetRequest("a")] * 3, lims)] == [True, True, False]
    s.charge("a", calls=-1, limits=lims)  # the call was never made
    assert s.take_budget("a", limits=lims).allowed
    clock.t += 10
    assert s.budget_remaining("a", lims) == {"burst": 2}


def test_registry_keep_k_fetch_and_rollback(clock: Clock) -> None:
    s = MemoryState(StateConfig(registry_keep=2), clock=clock)
    assert s.fetch("m") is None and s.latest_version("m") is None
    for v in (1, 2, 3):
        entry = s.publish("m", v, f"blob{v}".encode())
        assert entry.version == v and entry.size == 5
    assert [e.version for e in s.versions("m")] == [2, 3]
    assert s.fetch("m") == (3, b"blob3") and s.fetch("m", 2) == (2, b"blob2") and s.fetch("m", 1) is None
    s.rollback("m", 2)
    assert s.latest_version("m") == 2 and s.fetch("m") == (2, b"blob2")
    with pytest.raises(KeyError):
        s.rollback("m", 1)
    s.publish("m", 4, b"blob4")
    assert [e.version for e in s.versions("m")] == [3, 4] and s.current_versions() == {"m": 4}


def test_watcher_polls_only_when_woken_or_due(clock: Clock) -> None:
    s = MemoryState()
    s.publish("a", 1, b"x")
    w = s.watcher(poll_interval_s=5.0, known={"b": 9})
    w._clock = clock  # deterministic poll schedule
    reads = []
    real = s.registry_head
    s.registry_head = lambda names=None: reads.append(1) or real(names)  # type: ignore[method-assign]
    assert w.changed() == {"a": 1}
    assert w.changed() == {} and len(reads) == 1  # not due, not woken: no read at all
    s.publish("b", 10, b"y")  # the notice wakes it
    assert w.changed() == {"b": 10} and len(reads) == 2
    s._current["a"] = 3  # a change nobody announced ...
    assert w.changed() == {}
    clock.t += 5.0  # ... is found by the next poll
    assert w.changed() == {"a": 3}
    w.close()
    s.publish("a", 2, b"z")
    assert s._listeners == []


def test_live_params_round_trip() -> None:
    s = MemoryState()
    assert s.get_live_params() is None
    p = LiveParams(mu=0.3, thresholds={"logistic": 0.8}, exploration_scale=0.5)
    s.set_live_params(p)
    got = s.get_live_params()
    assert got == p and got is not p
    got.thresholds["logistic"] = 0.1  # type: ignore[union-attr]
    assert s.get_live_params() == p  # callers cannot mutate the stored copy


def test_idempotency_claim_release_seen_and_ttl(clock: Clock) -> None:
    s = MemoryState(StateConfig(idempotency_ttl_s=30), clock=clock)
    assert s.claim_events(["a", "b"]) == [True, True]
    assert s.claim_events(["a", "c", "c"]) == [False, True, False]
    assert s.seen(["a", "b", "c", "d"]) == [True, True, True, False]
    s.release_events(["a"])
    assert s.claim_events(["a"]) == [True]
    clock.t += 30
    assert s.seen(["a", "b"]) == [False, False] and s.claim_events(["b"]) == [True]
    assert s.claim_events([]) == []
    assert (s.stats["events_claimed"], s.stats["events_duplicate"]) == (5, 2)


def test_make_state_picks_the_backend() -> None:
    s = make_state(load_config(None))
    assert isinstance(s, MemoryState) and s.ping()
    from cascade.state.redis_store import RedisState

    r = make_state(load_config(None, state={"backend": "redis"}, redis={"url": "redis://127.0.0.1:1/0"}))
    assert isinstance(r, RedisState)  # constructing connects lazily: no server needed
    r.close()
