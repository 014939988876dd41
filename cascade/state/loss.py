"""Detecting a state store that was emptied under a running pipeline (Redis restarted without
persistence, a failover to an empty replica, a FLUSHDB).

A marker key (``KeySpace.marker``) is written when the pipeline first starts. A worker whose
consumer group had committed offsets when it started knows the pipeline ran before, so a
marker missing then, or missing at any later check, means the store lost what it held:

* idempotency records: an event delivered again may be decided a second time;
* budget counters: the current budget windows start from zero again;
* the decision cache, the registry and the live parameters (the learner republishes).

``fail_open`` warns (an error log, then a warning every ``warn_every_s``) until an operator
confirms with ``cascade state confirm-loss``, which writes the marker again; ``fail_closed``
also holds LLM calls until then (:attr:`LossDetector.holding`).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Literal

from cascade.logging import get_logger
from cascade.state.base import StateStore, StateUnavailable

log = get_logger("cascade.state.loss")

OnLoss = Literal["fail_open", "fail_closed"]
CONFIRM_COMMAND = "cascade state confirm-loss"
LOST = {
    "idempotency_records": "events delivered again may be decided twice",
    "budget_counters": "the current budget windows restart from zero",
    "decision_cache": "cached answers are gone (more tier and LLM work)",
}


def marker_value(by: str) -> str:
    return f"{by} {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}"


def confirm_loss(state: StateStore, by: str = "confirm-loss") -> str:
    """The operator's confirmation: write the marker again; workers clear their alarm on their
    next check. Returns the value written."""
    value = marker_value(by)
    state.mark_pipeline(value, replace=True)
    return value


class LossDetector:
    """Checks the pipeline marker at most every ``every_s`` (unless forced).

    ``group_had_offsets``: whether this worker's consumer group had committed offsets when the
    worker started. Only the first check that reaches the store may create a missing marker,
    and only if that is False (a new pipeline): later, a missing marker is always a loss, so a
    worker that never committed cannot cover up a loss that others would see.
    """

    def __init__(self, state: StateStore, on_loss: OnLoss, group_had_offsets: bool, who: str, *,
                 every_s: float = 2.0, warn_every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state = state
        self.on_loss = on_loss
        self.group_had_offsets = group_had_offsets
        self.who = who
        self.every_s = every_s
        self.warn_every_s = warn_every_s
        self._clock = clock
        self._checked_at: float | None = None
        self._first = True
        self._warned_at = 0.0
        self.detected = False

    @property
    def holding(self) -> bool:
        """Whether LLM calls are to be held (``fail_closed`` and a loss not yet confirmed)."""
        return self.detected and self.on_loss == "fail_closed"

    def check(self, force: bool = False) -> bool:
        """Whether a loss is detected and not yet confirmed; unchanged while the store is away."""
        now = self._clock()
        if not force and self._checked_at is not None and now - self._checked_at < self.every_s:
            return self.detected
        self._checked_at = now
        try:
            marker = self.state.pipeline_marker()
            if marker is None and self._first and not self.group_had_offsets:
                self.state.mark_pipeline(marker_value(self.who))
                log.info("state.pipeline_marker_created", by=self.who)
                marker = "created"
        except StateUnavailable:
            return self.detected
        self._first = False
        if marker is not None:
            if self.detected:
                log.warning("state.redis_loss_confirmed", by=self.who, marker=marker)
            self.detected = False
        elif not self.detected:
            self.detected = True
            self._warned_at = now
            log.error("state.redis_loss_detected", worker=self.who, on_redis_loss=self.on_loss, lost=LOST,
                      llm_calls="held until confirmed" if self.on_loss == "fail_closed" else "going on",
                      hint=f"make Redis durable (docs/deploy.md); then run `{CONFIRM_COMMAND}`")
        elif now - self._warned_at >= self.warn_every_s:
            self._warned_at = now
            log.warning("state.redis_loss_unconfirmed", worker=self.who, on_redis_loss=self.on_loss,
                        hint=f"run `{CONFIRM_COMMAND}`")
        return self.detected
