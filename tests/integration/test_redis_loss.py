"""The detector of an emptied Redis, against a real Redis: FLUSHDB → detected; confirm-loss → cleared;
fail_closed holds LLM calls meanwhile; a new pipeline creates its marker instead of alarming."""

from __future__ import annotations

import time

import redis

from cascade.config import load_config
from cascade.state import make_state
from cascade.state.loss import LossDetector, confirm_loss
from workers.cli import main as cli_main


def state_for(url: str, on_loss: str = "fail_open"):
    config = load_config(None, redis={"url": url, "key_prefix": "loss:"}, state={"backend": "redis", "on_redis_loss": on_loss},
                         pipeline="p1")
    return config, make_state(config)


def test_a_new_pipeline_writes_its_marker_and_a_flush_is_detected_then_confirmed(private_redis):
    _, state = state_for(private_redis.url)
    first = LossDetector(state, "fail_open", group_had_offsets=False, who="tier-a", every_s=0)
    assert not first.check()
    assert state.pipeline_marker() is not None  # created by the first worker of a new pipeline
    later = LossDetector(state, "fail_open", group_had_offsets=True, who="llm", every_s=0)
    assert not later.check()

    redis.Redis.from_url(private_redis.url).flushdb()
    assert first.check() and later.check()  # the worker that created it does not re-create it
    assert not later.holding  # fail_open: warns, holds nothing
    assert state.pipeline_marker() is None

    confirm_loss(state)
    assert not first.check() and not later.check()
    state.close()


def test_fail_closed_holds_until_the_cli_confirms(private_redis):
    config, state = state_for(private_redis.url, "fail_closed")
    llm = LossDetector(state, "fail_closed", group_had_offsets=False, who="llm", every_s=0)
    assert not llm.check() and not llm.holding
    redis.Redis.from_url(private_redis.url).flushdb()
    assert llm.check() and llm.holding

    config_file = private_redis.run_dir / "cascade.yaml"
    config_file.write_text(config.model_dump_json())  # JSON is YAML
    assert cli_main(["--config", str(config_file), "state", "confirm-loss"]) == 0
    assert not llm.check() and not llm.holding
    state.close()


def test_a_store_that_is_away_leaves_the_verdict_unchanged(private_redis):
    _, state = state_for(private_redis.url)
    d = LossDetector(state, "fail_open", group_had_offsets=True, who="tier-a", every_s=0)
    state.mark_pipeline("x")
    assert not d.check()
    private_redis.stop()
    assert not d.check()  # unknown is not lost
    private_redis.restart()  # empty: persistence is off
    while not state.ping():  # the client's backoff lets a probe through within a second or two
        time.sleep(0.05)
    assert d.check()
    state.close()


def test_an_upgraded_pipeline_without_a_marker_reports_a_loss_once_confirmed_it_stays_quiet(private_redis):
    _, state = state_for(private_redis.url)
    d = LossDetector(state, "fail_open", group_had_offsets=True, who="tier-a", every_s=0)
    assert d.check()  # offsets committed, no marker: indistinguishable from a loss (docs/deploy.md)
    confirm_loss(state)
    assert not d.check()
    state.close()
