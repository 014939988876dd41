"""One stage of the cascade: a cheap tier and its deferral policy routing a batch of events."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from cascade.deferral.features import confidence_features
from cascade.deferral.policy import DeferralPolicy
from cascade.messages import Event, LiveParams, RoutingSnapshot, TierOutput
from cascade.tiers.base import Tier


class Action(str, Enum):
    ANSWER = "answer"
    DEFER = "defer"  # to the next tier (the LLM after the last one)
    EXPLORE = "explore"  # the policy would answer; sent straight to the LLM for a demonstration


@dataclass
class StageRouting:
    """What a stage decided for a batch, as arrays: per-event objects are built only where needed
    (a serving worker needs a ``TierOutput`` only for the events it passes up)."""

    tier: str
    version: int
    actions: list[Action]
    labels: list[str]
    confidence: list[float]
    probs: np.ndarray
    policy_features: np.ndarray
    p_agree: list[float] | None  # None while the policy is cold
    risk: list[float] | None  # (1 - p_agree) x miss weight, what the threshold is compared with; None while cold
    inputs: Sequence[Any]  # the tier's prepared batch, reused by in-process learning

    def output(self, i: int) -> TierOutput:
        """What the tier said about event ``i``, as carried up the cascade."""
        return TierOutput(
            tier=self.tier, version=self.version, probs=self.probs[i].tolist(),
            policy_features=self.policy_features[i].tolist(),
            p_agree=None if self.p_agree is None else self.p_agree[i],
            explored=self.actions[i] is Action.EXPLORE,
        )


class RoutingStats:
    """Exponential moving averages of what a stage does, for the deferral costs of the stage below."""

    def __init__(self, alpha: float = 0.01) -> None:
        self.alpha = alpha
        self.answer_rate = 0.0
        self.answered_disagreement = 0.0  # mean 1 - p over answered events: expected disagreement
        self.seen = 0

    def update(self, answered: bool, p_agree: float) -> None:
        a = max(self.alpha, 1.0 / (self.seen + 1))
        self.answer_rate += a * ((1.0 if answered else 0.0) - self.answer_rate)
        if answered:
            self.answered_disagreement += a * ((1.0 - p_agree) - self.answered_disagreement)
        self.seen += 1


class Stage:
    def __init__(
        self, tier: Tier, policy: DeferralPolicy, params: LiveParams, seed: int, miss_costs: dict[str, float] | None = None
    ) -> None:
        self.tier = tier
        costs = miss_costs or {}
        self.miss_costs = np.array([costs.get(label, 1.0) for label in tier.labels])
        self.policy = policy
        self.params = params
        self.rng = random.Random(seed)
        self.stats = RoutingStats()

    def routing(self) -> RoutingSnapshot:
        """What this stage does, as the stages below need it for their deferral costs."""
        s = self.stats
        return RoutingSnapshot(tier=self.tier.name, cost=self.tier.cost, answer_rate=s.answer_rate,
                               answered_disagreement=s.answered_disagreement, seen=s.seen)

    def policy_features(
        self, probs: np.ndarray, lower: Sequence[TierOutput | None], inputs: Sequence[Any] | None = None
    ) -> np.ndarray:
        """This tier's confidence features, then any extra features the tier gives for ``inputs``
        (``Tier.extra_features``), then the lower tier's (its whole chain)."""
        own = confidence_features(probs)
        extra = self.tier.extra_features(inputs, probs) if inputs is not None else None
        if extra is not None:
            own = np.hstack([own, extra])
        if all(o is None for o in lower):
            return own
        width = next(len(o.policy_features) for o in lower if o is not None)
        below = np.array([o.policy_features if o is not None else [0.0] * width for o in lower])
        return np.hstack([own, below])

    def miss_weight(self, probs: np.ndarray, best: np.ndarray) -> np.ndarray:
        """Expected cost of a disagreement: the miss costs of the other labels, weighted by the tier's belief."""
        others = probs.copy()
        if len(best) == 1:  # the in-process engine's batches: Python scalars, the same IEEE arithmetic
            others[0, int(best[0])] = 0.0
            mass, weighted = float(others.sum(axis=1)[0]), float((others @ self.miss_costs)[0])
            return np.array([weighted / max(mass, 1e-12) if mass > 0 else 1.0])
        others[np.arange(len(best)), best] = 0.0
        mass = others.sum(axis=1)
        weighted = others @ self.miss_costs
        return np.where(mass > 0, weighted / np.maximum(mass, 1e-12), 1.0)

    def route(self, events: Sequence[Event], lower: Sequence[TierOutput | None] | None = None) -> StageRouting:
        lower = lower if lower is not None else [None] * len(events)
        inputs = self.tier.prepare(events)
        probs = self.tier.predict_proba(inputs)
        feats = self.policy_features(probs, lower, inputs)
        warm = self.policy.warm(self.tier.version)
        p = self.policy.p_agree(feats) if warm else np.zeros(len(events))
        threshold = self.policy.threshold(self.params.mu, self.params.thresholds.get(self.tier.name))
        explore = self.policy.exploration() * self.params.exploration_scale
        best = probs.argmax(axis=1)
        risk = (1.0 - p) * self.miss_weight(probs, best)
        accept = (risk <= threshold).tolist() if warm else [False] * len(events)
        p_list = p.tolist()
        actions = []
        for ok, p_i in zip(accept, p_list):
            if ok and self.rng.random() < explore:
                action = Action.EXPLORE
            else:
                action = Action.ANSWER if ok else Action.DEFER
            self.stats.update(action is Action.ANSWER, p_i)
            actions.append(action)
        labels = self.tier.labels
        return StageRouting(
            tier=self.tier.name, version=self.tier.version, actions=actions,
            labels=[labels[j] for j in best.tolist()], confidence=probs[np.arange(len(events)), best].tolist(),
            probs=probs, policy_features=feats, p_agree=p_list if warm else None,
            risk=risk.tolist() if warm else None, inputs=inputs,
        )
