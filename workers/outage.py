"""Waiting out an outage of the broker or of the state store, instead of exiting.

Every Kafka call of the shared loop (poll, produce and its acknowledgements, commit) and every
batch that needs the state store runs through :meth:`Outage.retry`: an error that can be retried
is retried with jittered, capped exponential backoff for up to ``timeout_s``. Meanwhile the
worker reports not ready and a gauge shows the outage; the log says when it starts, every
``log_every_s`` while it lasts, and when it ends. Past ``timeout_s`` :class:`OutageTimeout` is
raised and the worker exits with :data:`OUTAGE_EXIT_CODE`, for its supervisor to restart it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kafka.errors import (
    IllegalStateError,
    InvalidProducerEpochError,
    KafkaConnectionError,
    KafkaError,
    OutOfOrderSequenceNumberError,
    ProducerFencedError,
    UnknownProducerIdError,
)

from cascade.logging import get_logger

log = get_logger("cascade.worker.outage")

T = TypeVar("T")

OUTAGE_EXIT_CODE = 3  # distinct from a crash (1) and a usage error (2)

# The idempotent producer's session is gone (a restarted broker forgot its id, or a batch failed
# and left its sequence numbers behind): only a new producer gets on.
PRODUCER_FENCED: tuple[type[BaseException], ...] = (
    UnknownProducerIdError, OutOfOrderSequenceNumberError, InvalidProducerEpochError, ProducerFencedError,
    IllegalStateError,  # "Producer is closed forcefully": its batches were aborted
)


def causes(e: BaseException) -> list[BaseException]:
    """``e`` and what it was raised from, outermost first."""
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__
    return out


def producer_fenced(e: BaseException) -> bool:
    # A bare KafkaError is how kafka-python reports a producer it gave up on (e.g. "Unexpected
    # error in InitProducerIdResponse" from a broker restarted from memory); errors of a record
    # itself (too large, invalid) have classes of their own.
    return any(isinstance(c, PRODUCER_FENCED) or type(c) is KafkaError for c in causes(e))


def producer_broken(producer: object) -> bool:
    """Whether an idempotent producer is in its fatal state, where every send fails: e.g. a broker
    restarted from memory answered its InitProducerId with UnknownError. kafka-python reports that
    as a plain ``KafkaError``, so the state is read from the producer's transaction manager."""
    manager = getattr(producer, "_transaction_manager", None)
    has_fatal = getattr(manager, "has_fatal_error", None)
    return bool(has_fatal()) if callable(has_fatal) else False


def kafka_retriable(e: BaseException) -> bool:
    """Whether waiting can fix ``e``: kafka-python marks such errors ``retriable`` (timeouts, lost
    connections, no coordinator or leader); a fenced producer is fixed by a new one."""
    return any(getattr(c, "retriable", False) or isinstance(c, KafkaConnectionError) for c in causes(e)) \
        or producer_fenced(e)


class OutageTimeout(RuntimeError):
    """An outage lasted longer than the worker waits; it should exit with :data:`OUTAGE_EXIT_CODE`."""


class Interrupted(RuntimeError):
    """The worker was asked to stop while waiting out an outage."""


@dataclass(frozen=True)
class Backoff:
    """The wait before retry ``attempt`` (0-based): ``base_s * 2**attempt`` capped at ``cap_s``,
    jittered down to half so that workers do not retry in lockstep."""

    base_s: float = 0.2
    cap_s: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return min(self.cap_s, self.base_s * 2 ** min(attempt, 32)) * rng.uniform(0.5, 1.0)


class Outage:
    """Retries calls that fail for a reason waiting can fix, and tracks whether an outage is on.

    ``on_change(active)`` is called when an outage starts and ends (metrics, readiness); ``beat``
    while waiting (the liveness probe: waiting is not a hang); ``stopping`` ends the wait early.
    """

    def __init__(self, what: str, timeout_s: float, *, backoff: Backoff = Backoff(),
                 on_change: Callable[[bool], None] | None = None, on_retry: Callable[[str], None] | None = None,
                 beat: Callable[[], None] | None = None, stopping: Callable[[], bool] | None = None,
                 log_every_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> None:
        self.what = what
        self.timeout_s = timeout_s
        self.backoff = backoff
        self._on_change = on_change
        self._on_retry = on_retry
        self._beat = beat
        self._stopping = stopping
        self.log_every_s = log_every_s
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self.since: float | None = None  # clock time the current outage started
        self.outages = 0

    @property
    def active(self) -> bool:
        return self.since is not None

    def retry(self, op: str, fn: Callable[[], T], retriable: Callable[[BaseException], bool],
              on_failure: Callable[[BaseException, int], None] | None = None) -> T:
        """``fn()``, retried while it raises what ``retriable`` accepts. ``on_failure(error, attempt)``
        runs before each wait (e.g. re-creating a fenced producer). Raises :class:`OutageTimeout`
        once the outage is older than ``timeout_s``, :class:`Interrupted` when asked to stop."""
        attempt = 0
        logged_at = 0.0
        while True:
            try:
                result = fn()
            except Exception as e:
                if not retriable(e):
                    raise
                now = self._clock()
                if self.since is None:
                    self._start(op, e, now)
                    logged_at = now
                since = self.since if self.since is not None else now
                waited = now - since
                if now - logged_at >= self.log_every_s:
                    logged_at = now
                    log.warning(f"{self.what}.outage_continues", op=op, waited_s=round(waited, 1),
                                attempts=attempt + 1, error=repr(e)[:300])
                if waited >= self.timeout_s:
                    log.error(f"{self.what}.outage_timeout", op=op, waited_s=round(waited, 1),
                              timeout_s=self.timeout_s, error=repr(e)[:300])
                    raise OutageTimeout(f"{self.what} unavailable for {waited:.0f}s during {op}: {e!r}") from e
                if self._on_retry is not None:
                    self._on_retry(op)
                if on_failure is not None:
                    on_failure(e, attempt)
                self._wait(self.backoff.delay(attempt, self._rng))
                attempt += 1
                continue
            if self.since is not None:
                self._end(op, attempt)
            return result

    def _start(self, op: str, e: BaseException, now: float) -> None:
        self.since = now
        self.outages += 1
        log.warning(f"{self.what}.outage_started", op=op, error=repr(e)[:300], timeout_s=self.timeout_s)
        if self._on_change is not None:
            self._on_change(True)

    def _end(self, op: str, attempts: int) -> None:
        assert self.since is not None
        log.info(f"{self.what}.outage_ended", op=op, down_s=round(self._clock() - self.since, 1), retries=attempts)
        self.since = None
        if self._on_change is not None:
            self._on_change(False)

    def _wait(self, seconds: float) -> None:
        """Sleep in short steps: the liveness beat goes on and a stop request is heard."""
        end = self._clock() + seconds
        while True:
            if self._beat is not None:
                self._beat()
            if self._stopping is not None and self._stopping():
                raise Interrupted(f"stopped while waiting out a {self.what} outage")
            left = end - self._clock()
            if left <= 0:
                return
            self._sleep(min(left, 0.5))
