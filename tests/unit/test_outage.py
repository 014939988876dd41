"""The retry helper that waits out broker and state-store outages: the pure algorithm, on a fake clock."""

from __future__ import annotations

import random

import pytest
from kafka.errors import (
    CommitFailedError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumberError,
    UnknownProducerIdError,
)

from workers.kafka_io import ProduceError
from workers.outage import (
    Backoff,
    Interrupted,
    Outage,
    OutageTimeout,
    kafka_retriable,
    producer_broken,
    producer_fenced,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def failing(errors: list[BaseException], result: str = "ok"):
    """A call that raises each of ``errors`` in turn, then returns ``result``."""
    calls = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    fn.calls = calls  # type: ignore[attr-defined]
    return fn


def outage(clock: FakeClock, timeout_s: float = 300.0, **kw) -> Outage:
    return Outage("kafka", timeout_s, clock=clock, sleep=clock.sleep, rng=random.Random(1), **kw)


def wrapped(cause: BaseException) -> ProduceError:
    try:
        raise ProduceError("1 of 1 records failed") from cause
    except ProduceError as e:
        return e


def test_backoff_doubles_jittered_and_capped():
    b = Backoff(base_s=0.2, cap_s=5.0)
    rng = random.Random(0)
    for attempt in range(40):
        full = min(5.0, 0.2 * 2**attempt)
        d = b.delay(attempt, rng)
        assert full / 2 <= d <= full
    assert b.delay(1000, rng) <= 5.0  # no overflow however long the outage


def test_retriable_errors_are_retried_until_success_and_the_outage_is_reported():
    clock = FakeClock()
    changes: list[bool] = []
    retries: list[str] = []
    o = outage(clock, on_change=changes.append, on_retry=retries.append)
    fn = failing([KafkaTimeoutError(), KafkaConnectionError(), wrapped(KafkaTimeoutError())])
    assert o.retry("commit", fn, kafka_retriable) == "ok"
    assert len(fn.calls) == 4
    assert changes == [True, False]  # one outage: started, ended
    assert retries == ["commit"] * 3
    assert not o.active and o.outages == 1
    assert len(clock.slept) >= 3


def test_an_error_waiting_cannot_fix_is_raised_at_once():
    clock = FakeClock()
    o = outage(clock)
    for error in (MessageSizeTooLargeError(), CommitFailedError(), ValueError("bug")):
        with pytest.raises(type(error)):
            o.retry("produce", failing([error]), kafka_retriable)
    assert clock.slept == [] and not o.active


def test_an_outage_longer_than_the_timeout_raises_outage_timeout():
    clock = FakeClock()
    o = outage(clock, timeout_s=60.0)
    with pytest.raises(OutageTimeout):
        o.retry("poll", failing([KafkaTimeoutError()] * 10_000), kafka_retriable)
    assert 60.0 <= clock.now <= 60.0 + 5.0  # gave up at the first failure past the timeout


def test_a_fenced_producer_is_retriable_and_on_failure_sees_each_attempt():
    clock = FakeClock()
    seen: list[tuple[str, int]] = []
    o = outage(clock)
    fn = failing([wrapped(UnknownProducerIdError()), wrapped(OutOfOrderSequenceNumberError())])
    o.retry("produce", fn, kafka_retriable, on_failure=lambda e, n: seen.append((type(e.__cause__).__name__, n)))
    assert seen == [("UnknownProducerIdError", 0), ("OutOfOrderSequenceNumberError", 1)]
    assert producer_fenced(wrapped(UnknownProducerIdError()))
    assert producer_fenced(wrapped(KafkaError("Unexpected error in InitProducerIdResponse: [Error -1] UnknownError")))
    assert kafka_retriable(wrapped(KafkaError("Unexpected error in InitProducerIdResponse")))
    assert not producer_fenced(wrapped(MessageSizeTooLargeError()))
    assert not producer_fenced(wrapped(KafkaTimeoutError()))


def test_a_stop_request_ends_the_wait_and_the_liveness_beat_goes_on():
    clock = FakeClock()
    beats: list[float] = []
    stop = {"now": False}

    def beat() -> None:
        beats.append(clock.now)
        if clock.now > 20:
            stop["now"] = True

    o = outage(clock, beat=beat, stopping=lambda: stop["now"])
    with pytest.raises(Interrupted):
        o.retry("poll", failing([KafkaTimeoutError()] * 10_000), kafka_retriable)
    # Beats at least every half second of waiting: the liveness probe never sees a hang.
    assert all(b - a <= 0.5 + 1e-9 for a, b in zip(beats, beats[1:]))


def test_a_custom_predicate_retries_state_unavailable_only():
    from cascade.state import StateUnavailable

    clock = FakeClock()
    o = Outage("state", 300.0, clock=clock, sleep=clock.sleep, rng=random.Random(2))
    fn = failing([StateUnavailable("down"), StateUnavailable("down")])
    assert o.retry("process", fn, lambda e: isinstance(e, StateUnavailable)) == "ok"
    with pytest.raises(KafkaTimeoutError):
        o.retry("process", failing([KafkaTimeoutError()]), lambda e: isinstance(e, StateUnavailable))


def test_a_producer_in_its_fatal_state_is_broken():
    class Manager:
        def __init__(self, fatal: bool) -> None:
            self.fatal = fatal

        def has_fatal_error(self) -> bool:
            return self.fatal

    class Producer:
        def __init__(self, manager: object) -> None:
            self._transaction_manager = manager

    assert producer_broken(Producer(Manager(True)))
    assert not producer_broken(Producer(Manager(False)))
    assert not producer_broken(Producer(None))  # not idempotent: no manager, never "broken"
