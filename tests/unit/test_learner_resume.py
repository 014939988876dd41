"""A learner's resume logic on the embedded registry (MemoryState, real product code): each
demonstration learned exactly once across a crash between publish and commit, stale publishers
reloading instead of overwriting, and a registry that lost its data."""

from __future__ import annotations

import numpy as np
import pytest

from cascade.config import CascadeConfig, RedisConfig, load_config
from cascade.learning.learner import Learner
from cascade.learning.resume import LearnerProgress, SetPublisher
from cascade.messages import Event
from cascade.routing.build import build_stages
from cascade.routing.stage import Stage
from cascade.state import LearnerStep, MemoryState, StateUnavailable
from cascade.state.redis_store import RedisState
from devtools.services import free_port
from tests.unit.streams import WORDS, easy_and_hard

TOPIC = "demonstrations"


def config() -> CascadeConfig:
    return load_config(None, task={"labels": sorted(WORDS)}, deferral={"warmup": 10, "mu": 0.3})


class Learning:
    """What the learner worker holds: stages, a learner, its progress and its publisher."""

    def __init__(self, registry: MemoryState | RedisState) -> None:
        self.stages: list[Stage] = build_stages(config())
        self.learner = Learner(self.stages)
        self.progress = LearnerProgress(TOPIC)
        self.publisher = SetPublisher(registry, self.stages, self.learner, self.progress)

    def consume(self, records: list[tuple[int, int, Event, str]]) -> int:
        """The worker's process_batch: learn the records not in the models yet; returns how many."""
        fresh = [r for r in records if self.progress.fresh(r[0], r[1])]
        if fresh:
            self.learner.learn([r[2] for r in fresh], [r[3] for r in fresh])
            self.progress.advance((p, o) for p, o, _, _ in fresh)
        return len(fresh)


def stream(n: int) -> list[tuple[int, int, Event, str]]:
    """Demonstrations over two partitions as (partition, offset, event, LLM label)."""
    offsets = [0, 0]
    out = []
    for i, (e, _) in enumerate(easy_and_hard(n, seed=3)):
        p = i % 2
        out.append((p, offsets[p], e, e.payload["llm"]["test-llm"]))
        offsets[p] += 1
    return out


def probs(stages: list[Stage], events: list[Event]) -> np.ndarray:
    tier = stages[0].tier
    return tier.predict_proba(tier.prepare(events))


def test_progress_skips_what_a_step_includes_and_never_goes_back() -> None:
    p = LearnerProgress(TOPIC, LearnerStep(topic=TOPIC, offsets={0: 5, 1: 2}, demonstrations=7))
    assert [p.fresh(0, o) for o in (3, 4, 5, 6)] == [False, False, True, True]
    assert p.fresh(1, 2) and not p.fresh(1, 1) and p.fresh(2, 0)  # an unseen partition starts at 0
    p.advance([(0, 5), (0, 6), (2, 0)])
    assert p.step(9) == LearnerStep(topic=TOPIC, offsets={0: 7, 1: 2, 2: 1}, demonstrations=9)
    assert p.rebase(LearnerStep(topic=TOPIC, offsets={0: 3, 1: 8}, demonstrations=4))
    assert p.offsets == {0: 7, 1: 8, 2: 1}
    assert not p.rebase(LearnerStep(topic="other", offsets={0: 100}))  # another topic's offsets mean nothing here
    assert p.offsets == {0: 7, 1: 8, 2: 1}


def test_a_crash_between_publish_and_commit_learns_nothing_twice() -> None:
    registry = MemoryState()
    demos = stream(120)
    first = Learning(registry)
    first.publisher.load()
    assert first.consume(demos[:80]) == 80
    published = first.publisher.publish()
    assert published is not None and published.step == LearnerStep(topic=TOPIC, offsets={0: 40, 1: 40},
                                                                   demonstrations=80)
    first.consume(demos[80:90])  # learned, never published: the crash comes before the next publish
    # The Kafka commit did not happen: the restarted learner is handed everything from offset 0 again.
    restarted = Learning(registry)
    restarted.publisher.load()
    assert restarted.learner.demonstrations == 80 and restarted.stages[0].tier.version == 80
    assert restarted.consume(demos) == 40  # only what the set did not include
    assert restarted.learner.demonstrations == restarted.stages[0].tier.version == 120
    assert restarted.publisher.publish() is not None
    # The same models as one learner that saw each demonstration once.
    once = Learning(MemoryState())
    once.consume(demos)
    events = [d[2] for d in demos[:30]]
    assert np.allclose(probs(restarted.stages, events), probs(once.stages, events))
    step = registry.load_set([]).set
    assert step is not None and step.step == LearnerStep(topic=TOPIC, offsets={0: 60, 1: 60}, demonstrations=120)


def test_an_untrained_learner_never_publishes_over_a_newer_set() -> None:
    registry = MemoryState()
    demos = stream(100)
    trained = Learning(registry)
    trained.consume(demos[:60])
    assert trained.publisher.publish() is not None  # version 1 on a fresh registry
    # A learner that started from scratch without loading (e.g. while its registry was away).
    fresh = Learning(registry)
    fresh.consume(demos[60:70])
    assert fresh.publisher.publish() is None  # stale: refused, and the newer set loaded instead
    assert registry.fetch("tier:logistic") == (1, trained.stages[0].tier.snapshot())
    assert fresh.stages[0].tier.version == 60 and fresh.learner.demonstrations == 60
    assert fresh.progress.offsets == {0: 35, 1: 35}  # further of its own and the set's positions
    again = fresh.publisher.publish()
    assert again is not None and again.version == 2 and again.step is not None
    assert again.step.demonstrations == 60


def test_a_rollback_reloads_the_older_set_and_versions_still_grow() -> None:
    registry = MemoryState()
    demos = stream(90)
    learning = Learning(registry)
    for chunk in (demos[:30], demos[30:60]):
        learning.consume(chunk)
        assert learning.publisher.publish() is not None
    registry.rollback_set(1)
    learning.consume(demos[60:90])
    assert learning.publisher.publish() is None  # based on set 2 of epoch 0: reloads set 1
    assert learning.stages[0].tier.version == 30 and learning.learner.demonstrations == 30
    assert learning.progress.offsets == {0: 45, 1: 45}  # the models go back, not the stream
    later = learning.publisher.publish()
    assert later is not None and (later.epoch, later.version) == (1, 3)


def test_a_registry_that_lost_its_data_gets_the_models_back_above_every_seen_version() -> None:
    demos = stream(40)
    learning = Learning(MemoryState())
    learning.consume(demos[:20])
    for _ in range(3):
        assert learning.publisher.publish() is not None
    learning.publisher.registry = MemoryState()  # restarted empty
    assert learning.publisher.publish() is None  # stale (based on set 3), finds nothing: keeps its models
    assert learning.stages[0].tier.version == 20
    again = learning.publisher.publish()
    assert again is not None and again.version == 4 and again.step is not None
    assert again.step.demonstrations == 20


def test_an_unreachable_registry_raises_on_load_and_defers_publish() -> None:
    store = RedisState(RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.2))
    try:
        learning = Learning(store)
        with pytest.raises(StateUnavailable):
            learning.publisher.load()
        learning.consume(stream(10))
        assert learning.publisher.publish() is None  # never raises: retried at the next publish point
        assert learning.publisher.stale == 0
    finally:
        store.close()


def test_a_publish_that_timed_out_but_was_applied_is_taken_as_its_own() -> None:
    registry = MemoryState()
    demos = stream(60)
    learning = Learning(registry)
    learning.consume(demos[:30])
    # The client gave up waiting while the server applied it: the publisher still believes set 0.
    late = registry.publish_set({n: m.snapshot() for n, m in learning.publisher.models.items()},
                                learning.progress.step(30), base_epoch=0, base_version=0,
                                publisher=learning.publisher.token)
    learning.consume(demos[30:])
    published = learning.publisher.publish()  # stale, but on its own set: kept its models, published on top
    assert published is not None and published.version == late.version + 1 and learning.publisher.stale == 0
    assert published.step is not None and published.step.demonstrations == 60
    assert learning.stages[0].tier.version == 60  # nothing learned since the late publish was dropped
    # Another process's set is not taken for its own: that one is reloaded.
    other = Learning(registry)
    other.consume(demos[:10])
    assert other.publisher.publish() is None and other.publisher.stale == 1
    assert other.stages[0].tier.version == 60


def test_a_serving_stage_never_swaps_down_unless_an_operator_rolls_back() -> None:
    from cascade.learning.registry import ModelFollower

    registry = MemoryState()
    demos = stream(60)
    learning = Learning(registry)
    for chunk in (demos[:30], demos[30:]):
        learning.consume(chunk)
        assert learning.publisher.publish() is not None
    serving = build_stages(config())[0]
    swaps: list[tuple[str, int]] = []
    follower = ModelFollower(registry, registry, serving, every_s=0.0, on_swap=lambda n, v: swaps.append((n, v)))
    assert serving.tier.version == 60  # loaded set 2 on start
    untrained = build_stages(config())[0]
    registry.publish("tier:logistic", 0, untrained.tier.snapshot())  # a stale writer's lower version
    follower.poll()
    assert serving.tier.version == 60 and swaps == []
    registry.rollback_set(1)
    follower.poll()
    assert serving.tier.version == 30 and sorted(swaps) == [("policy:logistic", 1), ("tier:logistic", 1)]
