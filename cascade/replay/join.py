"""Joining recorded events with their recorded LLM answers, and the backend that replays them.

Where an answer comes from, first found wins:

1. ``cache``: the decision cache in the state store, by ``cache_key`` (only entries the LLM
   answered; cached cheap-tier answers are not LLM answers),
2. ``demonstrations``: the demonstrations topic, by event id,
3. ``decisions``: LLM decisions on the decisions topic, by event id (only when a decisions
   range is replayed; a decision ``llm_unusable`` records that the LLM gave no usable answer),
4. ``field``: the event's own recorded answers (``payload[llm.recorded_field][llm.name]``, the
   ``llm`` field of the ``../shared/data`` format).

An event found nowhere is *missing*: it is counted and listed, and left out of the replayed
stream, because the replay cannot know what the LLM would have said. It is never scored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cascade.config import LLMConfig
from cascade.messages import Event, LLMAnswer
from cascade.task import Task
from cascade.tiers.llm import RecordedAnswers

if TYPE_CHECKING:
    from cascade.state.base import StateStore

SOURCES = ("cache", "demonstrations", "decisions", "field")


@dataclass(frozen=True)
class RecordedEvent:
    """An event as recorded: the event, its gold label if the record has one, its timestamp (ms)."""

    event: Event
    gold: str | None = None
    ts_ms: int | None = None


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()
# Per event: the recorded raw answer (None = the LLM answered, unusably) or MISSING.
CacheLookup = Callable[[Sequence[Event]], list["str | None | _Missing"]]


@dataclass
class Joined:
    events: list[RecordedEvent]  # events with a recorded answer, in replay order
    answers: dict[str, str | None]  # event id -> recorded answer (None: the LLM gave no usable answer)
    sources: Counter[str] = field(default_factory=Counter)
    missing: list[str] = field(default_factory=list)  # ids of events without a recorded answer
    duplicates: int = 0  # repeated event ids in the range (the live system answers an id once)

    @property
    def missing_llm_answers(self) -> int:
        return len(self.missing)


def field_answer(event: Event, config: LLMConfig) -> str | None | _Missing:
    carried = event.payload.get(config.recorded_field)
    if isinstance(carried, dict) and config.name in carried:
        answer = carried[config.name]
        return answer if answer is None or isinstance(answer, str) else str(answer)
    return MISSING


def join_answers(
    rows: Sequence[RecordedEvent],
    config: LLMConfig,
    *,
    cache: CacheLookup | None = None,
    demonstrations: Mapping[str, str] | None = None,
    decisions: Mapping[str, str | None] | None = None,
    use_field: bool = True,
    batch: int = 1000,
) -> Joined:
    unique: list[RecordedEvent] = []
    seen: set[str] = set()
    duplicates = 0
    for r in rows:
        if r.event.id in seen:
            duplicates += 1
            continue
        seen.add(r.event.id)
        unique.append(r)
    found: list[str | None | _Missing] = [MISSING] * len(unique)
    source: list[str] = [""] * len(unique)
    if cache is not None:
        for start in range(0, len(unique), batch):
            chunk = unique[start : start + batch]
            for j, ans in enumerate(cache([r.event for r in chunk])):
                if ans is not MISSING:
                    found[start + j], source[start + j] = ans, "cache"
    for name, table in (("demonstrations", demonstrations), ("decisions", decisions)):
        if not table:
            continue
        for i, r in enumerate(unique):
            if found[i] is MISSING and r.event.id in table:
                found[i], source[i] = table[r.event.id], name
    if use_field:
        for i, r in enumerate(unique):
            if found[i] is MISSING:
                ans = field_answer(r.event, config)
                if ans is not MISSING:
                    found[i], source[i] = ans, "field"
    joined = Joined(events=[], answers={}, duplicates=duplicates)
    for r, ans, src in zip(unique, found, source):
        if ans is MISSING:
            joined.missing.append(r.event.id)
            continue
        joined.events.append(r)
        joined.answers[r.event.id] = ans  # type: ignore[assignment]
        joined.sources[src] += 1
    return joined


class JoinedAnswers(RecordedAnswers):
    """The replay's LLM: answers only with the joined recorded answers, never calls a model.

    An event without a joined answer raises ``no_recorded_answer`` (not retryable); the replay
    keeps such events out of the stream, so this is a guard, not a path.
    """

    def __init__(self, task: Task, config: LLMConfig, answers: Mapping[str, str | None]) -> None:
        super().__init__(task, config.model_copy(update={"backend": "recorded", "recorded_path": None}))
        self._answers = answers
        self.calls = 0

    def recorded(self, event: Event) -> tuple[bool, str | None]:
        if event.id in self._answers:
            return True, self._answers[event.id]
        return False, None

    def answer(self, events: Sequence[Event]) -> list[LLMAnswer]:
        out = super().answer(events)
        self.calls += len(events)
        return out


def state_cache_lookup(state: StateStore, task: Task) -> CacheLookup:
    """Recorded LLM answers from the decision cache: entries the LLM answered, by ``cache_key``."""
    from cascade.state.keys import cache_keys

    def look(events: Sequence[Event]) -> list[str | None | _Missing]:
        keys = cache_keys(task.name, task.labels, [e.text for e in events])
        return [
            d.label if d is not None and d.tier == "llm" and d.label is not None else MISSING
            for d in state.get_decisions(keys)
        ]

    return look
