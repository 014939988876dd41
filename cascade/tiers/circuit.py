"""A circuit breaker: stop calling an endpoint that keeps failing, for a while.

Closed: calls go through; ``failure_threshold`` consecutive failures open it. Open: every call
is refused at once (``CircuitOpen``, with the seconds until it half-opens) for ``open_s``
seconds. Half-open: calls go through again as trials (as many as the caller's concurrency, which
the LLM worker bounds); the first success closes the circuit, a failure opens it again for
another ``open_s``. Letting the concurrent callers through, rather than one trial while the
others are refused, keeps them from using up their retries while a slow trial is in flight.
Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]


class CircuitOpen(Exception):
    """The circuit refuses calls; ``retry_in_s`` until it lets a trial call through."""

    def __init__(self, retry_in_s: float) -> None:
        super().__init__(f"circuit open, next trial in {retry_in_s:.1f}s")
        self.retry_in_s = retry_in_s


class CircuitBreaker:
    def __init__(self, failure_threshold: int, open_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1 or open_s <= 0:
            raise ValueError("failure_threshold must be >= 1 and open_s > 0")
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self.opened_count = 0  # how often it opened (for logs and tests)

    @property
    def state(self) -> State:
        with self._lock:
            return self._state()

    def _state(self) -> State:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at < self.open_s:
            return "open"
        return "half_open"

    def before_call(self) -> None:
        """Raise CircuitOpen when the call must not be made now."""
        with self._lock:
            if self._state() == "open":
                assert self._opened_at is not None
                raise CircuitOpen(self.open_s - (self._clock() - self._opened_at))

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None

    def record_failure(self) -> bool:
        """Count a failure; True when this failure opened the circuit."""
        with self._lock:
            self._failures += 1
            state = self._state()
            if state == "half_open" or (state == "closed" and self._failures >= self.failure_threshold):
                self._opened_at = self._clock()
                self.opened_count += 1
                return True
            return False

    def release(self) -> None:
        """A call that ended neither in success nor in an endpoint failure (a 4xx, say)."""
