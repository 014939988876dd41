"""The LLM tier: the backend interface, the recorded-answer backend, and retries."""

from __future__ import annotations

import gzip
import json
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

from cascade.config import LLMConfig
from cascade.messages import Event, LLMAnswer
from cascade.task import Task, answer_text
from cascade.tiers.registry import build_backend

CIRCUIT_OPEN = "circuit_open"  # the reason of a call refused by an open circuit breaker


class LLMError(Exception):
    """A failed LLM call. ``retryable`` failures are retried with backoff, the rest dead-lettered."""

    def __init__(self, reason: str, detail: str = "", retryable: bool = True, retry_after_s: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.retryable = retryable
        self.retry_after_s = retry_after_s  # the server's Retry-After (or an open circuit's wait), if any


class LLMBackend(ABC):
    def __init__(self, task: Task, config: LLMConfig) -> None:
        self.task = task
        self.config = config
        self.name = config.name

    @abstractmethod
    def answer(self, events: Sequence[Event]) -> list[LLMAnswer]:
        """One answer per event, in order; raises LLMError when the call as a whole failed."""


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class RecordedAnswers(LLMBackend):
    """Answers with an LLM answer recorded earlier: carried by the event or looked up by id in a file.

    Used by benchmarks, demos and replays: the answers are real outputs of a real LLM,
    so a stream can be re-run at no LLM cost.
    """

    def __init__(self, task: Task, config: LLMConfig) -> None:
        super().__init__(task, config)
        self._by_id: dict[str, object] = {}
        if config.recorded_path is not None:
            for row in _read_jsonl(config.recorded_path):
                answers = row.get(config.recorded_field) or {}
                if config.name in answers:
                    self._by_id[str(row["id"])] = answers[config.name]

    def recorded(self, event: Event) -> tuple[bool, object]:
        """(found, raw answer); an answer recorded as null is found and unusable."""
        carried = event.payload.get(self.config.recorded_field)
        if isinstance(carried, dict) and self.name in carried:
            return True, carried[self.name]
        if event.id in self._by_id:
            return True, self._by_id[event.id]
        return False, None

    def answer(self, events: Sequence[Event]) -> list[LLMAnswer]:
        out = []
        for e in events:
            found, raw = self.recorded(e)
            if not found:
                raise LLMError("no_recorded_answer", f"event {e.id} has no answer of {self.name}", retryable=False)
            # A recorded answer may be any JSON value: LLMAnswer.raw holds its text.
            out.append(LLMAnswer(raw=answer_text(raw), label=self.task.map_answer(raw), cost=self.config.cost))
        return out


def make_backend(task: Task, config: LLMConfig) -> LLMBackend:
    """A new backend of ``config.backend``, one of the registered kinds (cascade/tiers/registry.py)."""
    return build_backend(task, config)


def call_with_retries(
    call: Callable[[], list[LLMAnswer]],
    max_retries: int,
    backoff_s: float,
    rng: random.Random,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[int, LLMError], None] | None = None,
    retry_if: Callable[[LLMError], bool] = lambda e: e.retryable,
) -> list[LLMAnswer]:
    """Exponential backoff with full jitter (at least the error's ``retry_after_s`` when it has one);
    errors ``retry_if`` declines and the last failure propagate."""
    attempt = 0
    while True:
        try:
            return call()
        except LLMError as e:
            if not retry_if(e) or attempt >= max_retries:
                raise
            if on_retry is not None:
                on_retry(attempt, e)
            sleep(retry_delay(attempt, backoff_s, rng, e))
            attempt += 1


def retry_delay(attempt: int, backoff_s: float, rng: random.Random, error: LLMError) -> float:
    """Seconds before retry ``attempt`` (0-based): exponential backoff with full jitter, at least
    the error's ``retry_after_s``."""
    return max(rng.uniform(0, backoff_s * (2**attempt)), error.retry_after_s or 0.0)
