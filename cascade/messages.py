"""Messages that cross a boundary (topics, the state store, the CLI): one pydantic model each."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Event(Message):
    """A user's event, validated: its id, its text, and the original JSON payload."""

    id: str
    text: str
    payload: dict[str, Any] = Field(default_factory=dict)


DecisionReason = Literal[
    "tier",  # a cheap tier's policy accepted
    "llm",  # the LLM answered
    "cache",  # a cached decision answered before any tier ran
    "llm_unusable",  # the LLM gave no usable answer; the best cheap answer stands, if any
    "budget_exhausted",  # the LLM budget was exhausted; the best cheap answer stands
]


class Decision(Message):
    event_id: str
    label: str | None
    tier: str
    confidence: float
    reason: DecisionReason
    explored: bool = False
    model_versions: dict[str, int] = Field(default_factory=dict)
    cost: float = 0.0
    ts: float = Field(default_factory=time.time)


class TierOutput(Message):
    """What one cheap tier said about an event; carried up the cascade for the next policies."""

    tier: str
    version: int
    probs: list[float]
    policy_features: list[float]
    p_agree: float | None = None
    explored: bool = False  # the policy would have answered; sent to the LLM to explore

    def label(self, labels: list[str]) -> str:
        return labels[max(range(len(self.probs)), key=self.probs.__getitem__)]


class Demonstration(Message):
    """An LLM answer the cheap tiers learn from (imitation)."""

    event_id: str
    text: str
    llm: str
    llm_label: str
    explored: bool = False
    ts: float = Field(default_factory=time.time)


class LLMAnswer(Message):
    raw: str | None
    label: str | None
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    latency_s: float = 0.0


class LiveParams(Message):
    """Deferral parameters running workers read live, so a replay can re-tune a deployment."""

    mu: float = Field(ge=0)
    thresholds: dict[str, float] = Field(default_factory=dict, description="per-tier overrides of the mu rule")
    exploration_scale: float = Field(1.0, ge=0, le=1, description="multiplies every tier's exploration rate")
    updated_at: float = Field(default_factory=time.time)


class RoutingSnapshot(Message):
    """How often a stage answers and how much it is expected to disagree with the LLM when it does.

    Tier workers share these through the state store: a stage's deferral cost depends on what the
    stages above it do, and in a deployment each worker runs only its own stage.
    """

    tier: str
    cost: float = Field(ge=0)
    answer_rate: float = Field(ge=0, le=1)
    answered_disagreement: float = Field(ge=0, le=1)
    seen: int = Field(0, ge=0)
    updated_at: float = Field(default_factory=time.time)


class ContractTally(Message):
    """What a tier worker answered and scored since its previous audit: the quality contract's
    estimator and controller run in the LLM worker, which sees no cheap answer otherwise."""

    tier: str
    answered: int = Field(0, ge=0)
    risk: list[float] = Field(default_factory=list)  # the stage's risk scores, answered or not
    p_agree: list[float] = Field(default_factory=list)  # the policy's p for the same events


class Origin(Message):
    """The Kafka record an event came in as, where the output needs more than the parsed event:
    ``output.mode: enriched`` emits the event under its own key, with its own headers, from
    whichever worker decides it (the LLM's, for a deferred event). Bytes travel base64 in JSON."""

    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64")

    key: bytes | None = None
    headers: list[tuple[str, bytes | None]] = Field(default_factory=list)


class Deferred(Message):
    """An event passed up the cascade: to the next tier's topic or the LLM's."""

    event: Event
    outputs: list[TierOutput] = Field(default_factory=list)  # what the tiers below said
    explored: bool = False
    cost: float = 0.0  # spent on it so far
    first_seen: float = Field(default_factory=time.time)
    llm_holds: int = Field(0, ge=0, description="times requeued because the LLM endpoint's circuit was open")
    # A copy of an event the last tier in ``outputs`` answered, for the LLM to audit: its answer is a
    # demonstration and a measurement, never a second decision.
    audit: bool = False
    tally: ContractTally | None = None  # carried by audits
    # Set by the first tier only when the output is enriched: the event's key and headers. Left out
    # of the JSON when unset, so workers of the previous release (extra="forbid") still read the
    # deferrals of a rolling update in the default output mode.
    origin: Origin | None = Field(None, exclude_if=lambda origin: origin is None)


class DeadLetter(Message):
    """An input that could not be answered, with why and the original bytes (base64).

    An original too large to carry whole (the record must fit the producer's and the broker's
    request size) is ``truncated``: ``original_b64`` then holds its first bytes only, and
    ``original_size`` and ``original_sha256`` name the whole.
    """

    reason: str
    detail: str
    stage: str
    source_topic: str
    partition: int
    offset: int
    key: str | None = None
    original_b64: str
    original_size: int = 0
    original_sha256: str = ""
    truncated: bool = False
    ts: float = Field(default_factory=time.time)
