"""Pipelines sharing one Redis: every key is scoped by the pipeline, budgets only when shared on purpose."""

from __future__ import annotations

import time

import pytest

from cascade.config import load_config
from cascade.messages import LiveParams
from cascade.state import make_state
from workers.tier_worker import TierWorker

pytestmark = pytest.mark.integration


def config(redis_url: str, root: str, pipeline: str | None, prefix: str = "cascade.", **budget):
    return load_config(None, pipeline=pipeline, kafka={"topic_prefix": prefix}, redis={"url": redis_url, "key_prefix": root},
                       state={"backend": "redis"}, budget={"calls_per_day": 3, "pace": False, **budget}, server={"metrics_port": 0})


def test_pipeline_defaults_to_the_topic_prefix():
    assert load_config(None).pipeline == "cascade"
    assert load_config(None, kafka={"topic_prefix": "fraud."}).pipeline == "fraud"
    assert load_config(None, pipeline="x", kafka={"topic_prefix": "fraud."}).pipeline == "x"


def test_an_empty_pipeline_keeps_the_unscoped_layout(redis_url):
    root = f"test-scope-{time.time_ns()}:"
    state = make_state(config(redis_url, root, ""))
    assert state.keys.event == f"{root}evt:" and state.keys.budget == f"{root}budget:"
    assert make_state(config(redis_url, root, "p")).keys.event == f"{root}p:evt:"


def test_two_pipelines_with_the_same_ids_both_decide_every_event(redis_url):
    root = f"test-scope-{time.time_ns()}:"
    a, b = config(redis_url, root, "alpha"), config(redis_url, root, "beta")
    ids = [f"e{i}" for i in range(50)]
    wa, wb = (TierWorker(c, c.tiers[0].name, metrics_port=0) for c in (a, b))
    try:
        assert wa.undecided(ids) == ids
        assert wa.state.claim_events(ids) == [True] * 50
        assert wa.undecided(ids) == []
        assert wb.undecided(ids) == ids  # another pipeline: nothing decided there yet
        assert wb.state.claim_events(ids) == [True] * 50
        # live parameters and the registry are per pipeline too
        wa.state.set_live_params(LiveParams(mu=0.25))
        assert wb.state.get_live_params() is None or wb.state.get_live_params().mu != 0.25
        wa.state.publish("t", 1, b"blob")
        assert "t" in wa.state.current_versions() and "t" not in wb.state.current_versions()
    finally:
        wa.health.close()
        wb.health.close()


def test_budgets_are_per_pipeline_unless_a_scope_shares_them(redis_url):
    root = f"test-scope-{time.time_ns()}:"
    own_a, own_b = (make_state(config(redis_url, root, p)) for p in ("alpha", "beta"))
    assert [own_a.take_budget().allowed for _ in range(3)] == [True] * 3
    assert not own_a.take_budget().allowed
    assert own_b.take_budget().allowed  # its own budget
    shared_a, shared_b = (make_state(config(redis_url, root, p, scope="team")) for p in ("gamma", "delta"))
    assert [shared_a.take_budget().allowed for _ in range(2)] == [True] * 2
    assert shared_b.take_budget().allowed
    assert not shared_b.take_budget().allowed and not shared_a.take_budget().allowed
