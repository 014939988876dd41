"""Budget pacing: spread a per-window LLM budget (calls or money) over the window.

The allowed spend rate is what is left of the budget over what is left of the window,
``(budget - spent - tokens) / (window_end - now)``, re-computed at every request. Allowance
accrues at that rate into a bucket of at most ``burst`` and a call is allowed when the bucket
holds its cost and the budget still does. Spending less than the rate early raises the rate
later; so when demand exceeds the budget the spend follows the rate, stays spread over the
window and little is left at its end, and spend never exceeds the budget. When the window ends
a new one starts with the full budget (unspent budget is not carried over).

Pure logic with an injectable clock (seconds, monotonic).

API::

    pacer = BudgetPacer(budget=10_000, window_seconds=3600, burst=None, clock=time.monotonic)
    pacer.try_spend(cost=1.0) -> bool      # allow (and charge) or deny one call
    pacer.spent, pacer.remaining, pacer.rate()  # this window's spend, what is left, calls/s allowed now
    pacer.snapshot() -> dict; BudgetPacer.from_snapshot(state, clock=...)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class BudgetPacer:
    def __init__(
        self,
        budget: float,
        window_seconds: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if budget <= 0 or window_seconds <= 0:
            raise ValueError("budget and window_seconds must be positive")
        self.budget = budget
        self.window_seconds = window_seconds
        # Default: 1% of the budget, at least one unit - absorbs random arrivals (a one-call
        # bucket denied a fifth of a Poisson demand at half the pace) and leaves at most 1% unspent.
        self.burst = burst if burst is not None else max(1.0, budget / 100)
        self.clock = clock
        self.window_start = clock()
        self.spent = 0.0
        self.tokens = min(self.burst, budget)  # the first call need not wait for accrual
        self._last = self.window_start

    @property
    def window_end(self) -> float:
        return self.window_start + self.window_seconds

    @property
    def remaining(self) -> float:
        return self.budget - self.spent

    def rate(self) -> float:
        """Spend per second allowed now: uncommitted budget over the time left."""
        left = self.window_end - self._last
        return max(0.0, self.remaining - self.tokens) / left if left > 0 else 0.0

    def _advance(self, now: float) -> None:
        if now >= self.window_end:
            # Skip whole windows an idle period may have spanned; a new window starts full.
            self.window_start += self.window_seconds * ((now - self.window_start) // self.window_seconds)
            self.spent = 0.0
            self.tokens = min(self.burst, self.budget)
            self._last = self.window_start
        if now > self._last:
            accrued = self.rate() * (now - self._last)
            self.tokens = min(self.burst, self.tokens + accrued, self.remaining)
            self._last = now

    def try_spend(self, cost: float = 1.0) -> bool:
        """Charge ``cost`` and return True if the pace and the budget allow it, else False."""
        self._advance(self.clock())
        # A call dearer than the bucket can hold waits until the bucket is full instead.
        need = min(cost, self.burst)
        if self.tokens + 1e-9 < need or self.spent + cost > self.budget + 1e-9:
            return False
        self.tokens = max(0.0, self.tokens - cost)
        self.spent += cost
        return True

    def snapshot(self) -> dict[str, Any]:
        """State relative to the clock's epoch; restore with a clock on the same epoch."""
        return {
            "budget": self.budget,
            "window_seconds": self.window_seconds,
            "burst": self.burst,
            "window_start": self.window_start,
            "spent": self.spent,
            "tokens": self.tokens,
            "last": self._last,
        }

    @classmethod
    def from_snapshot(cls, state: dict[str, Any], clock: Callable[[], float] = time.monotonic) -> BudgetPacer:
        pacer = cls(state["budget"], state["window_seconds"], burst=state["burst"], clock=clock)
        pacer.window_start, pacer.spent = state["window_start"], state["spent"]
        pacer.tokens, pacer._last = state["tokens"], state["last"]
        return pacer
