"""What the state layer stores and returns: one small model per record."""

from __future__ import annotations

import time
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from cascade.config import BudgetConfig
from cascade.messages import Decision, DecisionReason

BudgetMetric = Literal["calls", "tokens", "money"]

# Reasons a budget take gives when the store could not be asked (BudgetConfig.fail_closed).
UNREACHABLE = "budget_store_unreachable"
UNREACHABLE_FAIL_OPEN = "budget_store_unreachable_fail_open"


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CachedDecision(Record):
    """A decision as cached under its input's key; it answers later events with the same input."""

    event_id: str  # the event the decision was first made for
    label: str | None
    tier: str
    confidence: float
    reason: DecisionReason
    model_versions: dict[str, int] = Field(default_factory=dict)
    ts: float

    @classmethod
    def of(cls, d: Decision) -> CachedDecision:
        return cls(
            event_id=d.event_id, label=d.label, tier=d.tier, confidence=d.confidence,
            reason=d.reason, model_versions=dict(d.model_versions), ts=d.ts,
        )  # fmt: skip

    def answer(self, event_id: str | None = None) -> Decision:
        """The decision for an event answered from the cache (reason "cache", no cost)."""
        # Plain construction (it copies model_versions): in pydantic 2 faster than model_construct here.
        return Decision(
            event_id=event_id or self.event_id, label=self.label, tier=self.tier, confidence=self.confidence,
            reason="cache", explored=False, model_versions=self.model_versions, cost=0.0, ts=self.ts,
        )  # fmt: skip


def cacheable(d: Decision, cheap_answers: bool) -> bool:
    """The LLM's answers are always cached; cheap-tier answers only when configured.

    Fallbacks (llm_unusable, budget_exhausted) and cache hits are never cached: they are not
    answers anyone vouched for, and re-caching a hit would only extend its life.
    """
    return d.label is not None and (d.reason == "llm" or (cheap_answers and d.reason == "tier"))


class RegistryEntry(Record):
    """Metadata of one published snapshot version (the bytes are stored beside it)."""

    name: str
    version: int = Field(ge=0)
    size: int = Field(ge=0)
    sha256: str
    published_at: float = Field(default_factory=time.time)


class LearnerStep(Record):
    """Where the learner stood in the demonstrations topic when it took a snapshot: per partition,
    the next offset to learn. Stored with the snapshot set, so a restarted learner resumes exactly
    after what the published models include, whatever the Kafka commit says."""

    topic: str
    offsets: dict[int, int] = Field(default_factory=dict)  # partition -> next offset to learn
    demonstrations: int = Field(default=0, ge=0)  # learned into this line of snapshots, in total


class RegistrySet(Record):
    """One published set: every model of a publish (tiers and policies) under one version.

    Versions come from a per-pipeline counter that only grows; ``epoch`` grows with every
    operator rollback, the one way the current version may go down.
    """

    version: int = Field(ge=0)
    epoch: int = Field(ge=0)
    names: list[str]
    step: LearnerStep | None = None
    publisher: str | None = None  # who published it (a learner process's token)
    published_at: float = Field(default_factory=time.time)


class LoadedSet(NamedTuple):
    """The registry's current set as read in one consistent step (``load_set``)."""

    epoch: int
    version: int  # 0 when nothing was published as a set
    set: RegistrySet | None
    models: dict[str, tuple[int, bytes]]  # name -> (version, bytes) of each asked-for name found


class BudgetLimit(Record):
    """One fixed window: at most ``limit`` of ``metric`` per ``seconds`` (windows align to the epoch).

    ``paced``: the window's budget is spread over it. At ``elapsed`` seconds into the window at most
    ``paced_cap`` of it may be spent: its share of the budget so far plus a small burst. When demand
    exceeds the budget the spend follows that line, so it is neither used up in the first seconds nor
    left over at the end; spending less early leaves more to spend later."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # named in BudgetTake.reason when exhausted
    metric: BudgetMetric
    seconds: int = Field(gt=0)
    limit: float = Field(gt=0)
    paced: bool = False

    def paced_cap(self, elapsed: float) -> float:
        """What may have been spent ``elapsed`` seconds into the window (the Lua script's twin)."""
        burst = max(PACE_BURST_SHARE * self.limit, 1.0 if self.metric == "calls" else 0.0)
        return min(self.limit, self.limit * elapsed / self.seconds + burst)


# A paced window's burst: 1% of its budget (at least one call), so calls arriving at random are not
# refused for being a moment early.
PACE_BURST_SHARE = 0.01


def limits_from_config(cfg: BudgetConfig) -> list[BudgetLimit]:
    """The windows BudgetConfig switches on; none means the LLM spend is unlimited."""
    spec: list[tuple[str, BudgetMetric, int, float | None]] = [
        ("calls_per_minute", "calls", 60, cfg.calls_per_minute),
        ("calls_per_hour", "calls", 3600, cfg.calls_per_hour),
        ("calls_per_day", "calls", 86400, cfg.calls_per_day),
        ("tokens_per_day", "tokens", 86400, cfg.tokens_per_day),
        ("money_per_day", "money", 86400, cfg.money_per_day),
    ]
    return [BudgetLimit(name=n, metric=m, seconds=s, limit=v, paced=cfg.pace) for n, m, s, v in spec if v is not None]


class BudgetRequest(NamedTuple):
    """One intended LLM call (a plain tuple: batches of them are built on the hot path)."""

    tenant: str = "default"
    calls: int = 1
    tokens: int = 0
    money: float = 0.0


class BudgetTake(Record):
    """The answer to a budget take: allowed or not, why, and what is left in each window."""

    allowed: bool
    reason: str | None = None  # the exhausted window's name, or an UNREACHABLE reason
    remaining: dict[str, float] = Field(default_factory=dict)
