"""The continuous dispatch's parts, deterministic: watermarks, the AIMD limit, the retry timers,
and the fake LLM's latency."""

from __future__ import annotations

import random

from devtools.fake_llm import Latency
from workers.dispatch import AIMDLimit, RetryTimers, Watermarks
from workers.kafka_io import TopicPartition

A, B = TopicPartition("t", 0), TopicPartition("t", 1)


def test_the_watermark_is_the_lowest_unfinished_offset():
    marks = Watermarks()
    for off in (10, 11, 12, 13):
        marks.admit(A, off)
    assert marks.watermark(A) == 10 and marks.span(A) == 4
    marks.finish(A, 12)
    marks.finish(A, 11)
    assert marks.watermark(A) == 10  # 10 is still running: nothing past it is safe
    marks.finish(A, 10)
    assert marks.watermark(A) == 13 and marks.span(A) == 1
    marks.finish(A, 13)
    assert marks.watermark(A) == 14 and marks.span(A) == 0 and marks.unfinished() == 0


def test_a_slow_partition_holds_back_only_its_own_watermark():
    marks = Watermarks()
    for off in range(5):
        marks.admit(A, off)
        marks.admit(B, off)
    for off in range(1, 5):
        marks.finish(A, off)  # offset 0 of A is slow
        marks.finish(B, off)
    marks.finish(B, 0)
    assert marks.to_commit([A, B]) == {A: 0, B: 5}
    marks.committed({A: 0, B: 5})
    assert marks.to_commit([A, B]) == {}  # nothing moved since
    assert marks.lag() == 5 and marks.unfinished() == 1


def test_a_forgotten_partition_is_not_committed_and_ignores_late_finishes():
    marks = Watermarks()
    marks.admit(A, 3)
    marks.forget([A])
    marks.finish(A, 3)
    assert marks.watermark(A) is None and marks.to_commit([A]) == {}


def test_throttling_halves_the_limit_once_per_round_and_successes_restore_it():
    now = [0.0]
    limit = AIMDLimit(64, clock=lambda: now[0])
    now[0] = 1.0
    limit.throttled(started_at=0.5)
    assert limit.slots == 32
    limit.throttled(started_at=0.6)  # sent before the decrease: the same congestion
    assert limit.slots == 32
    now[0] = 2.0
    limit.throttled(started_at=1.5)
    assert limit.slots == 16
    for _ in range(10):
        limit.throttled(started_at=now[0])
        now[0] += 1
    assert limit.slots == 1  # never below the floor
    successes = 0
    while limit.slots < 64:
        limit.succeeded()
        successes += 1
    assert 64 * 63 / 2 * 0.9 < successes < 64 * 63 / 2 * 1.1  # about one more slot per limit's successes
    limit.succeeded()
    assert limit.limit == 64  # capped at the ceiling


def test_retry_timers_pop_what_is_due_in_time_order():
    timers: RetryTimers[str] = RetryTimers()
    timers.push(5.0, "late")
    timers.push(1.0, "first")
    timers.push(1.0, "second")  # same time: insertion order
    assert timers.next_due() == 1.0 and len(timers) == 3
    assert timers.pop_due(0.5) == []
    assert timers.pop_due(1.0) == ["first", "second"]
    assert timers.remove(lambda item: item == "late") == ["late"]
    assert len(timers) == 0 and timers.next_due() is None


def test_fake_latency_has_the_asked_quantiles():
    lat = Latency(0.8, 3.0, 8.0)
    rng = random.Random(1)
    samples = sorted(lat.sample(rng) for _ in range(100_000))
    q = lambda p: samples[int(p * len(samples))]  # noqa: E731
    assert abs(q(0.5) - 0.8) < 0.05 and abs(q(0.95) - 3.0) < 0.2 and abs(q(0.99) - 8.0) < 0.6
