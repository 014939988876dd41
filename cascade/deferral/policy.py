"""The learned deferral policy of one cheap tier (Nie et al., ICML 2024, imitation learning).

It predicts p = P(the tier's answer agrees with the LLM | confidence features), trained only
on events the LLM answered (the expert's demonstrations). The tier answers when the expected
disagreement of answering, 1 - p, is at most the expected loss of deferring:
``defer_disagreement + mu * defer_cost`` (costs in units of one LLM call). A decaying
exploration rate still sends some answerable events to the LLM so demonstrations keep covering
the events the tier answers; drift in the agreement stream (ADWIN) resets it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from river import drift, linear_model, optim

from cascade.config import DeferralConfig
from cascade.river_state import (
    adwin_from_state,
    adwin_state,
    logistic_from_state,
    logistic_state,
)
from cascade.snapshots import (
    SnapshotError,
    count,
    decode_snapshot,
    encode_snapshot,
    field,
)


@dataclass
class DeferralCost:
    """Expected consequences of passing an event up from this tier, per event deferred."""

    cost: float = 1.0  # in LLM calls: the next tiers' costs plus the LLM's share
    disagreement: float = 0.0  # with the LLM, of the answers the tiers above would give


class DeferralPolicy:
    kind = "deferral"

    def __init__(self, tier: str, config: DeferralConfig, warmup: int | None = None) -> None:
        self.tier = tier
        self.config = config
        self.warmup = config.warmup if warmup is None else warmup
        self.model = linear_model.LogisticRegression(
            optimizer=optim.AdaGrad(config.learning_rate), intercept_lr=config.learning_rate
        )
        self.adwin = drift.ADWIN(delta=config.drift_delta)
        self.demonstrations = 0
        self.since_drift = 0
        self.drifts = 0
        self.defer_cost = DeferralCost()
        self.version = 0
        self._weights: tuple[np.ndarray, float] | None = None  # numpy copy of the model, for p_agree


    # -- deciding -------------------------------------------------------------------------
    def warm(self, tier_version: int) -> bool:
        return tier_version >= self.warmup

    def p_agree(self, features: np.ndarray) -> np.ndarray:
        """river's ``predict_proba_one`` for every row at once (its per-row dicts cost more than the tier)."""
        if self.demonstrations == 0:
            return np.zeros(len(features))
        if self._weights is None or len(self._weights[0]) != features.shape[1]:
            w = self.model.weights
            self._weights = (np.array([w.get(i, 0.0) for i in range(features.shape[1])]), float(self.model.intercept))
        weights, intercept = self._weights
        z = features @ weights + intercept
        # np.minimum/np.maximum and masks: np.clip's and np.where's values, at a third of their
        # cost on the one-event batches of the in-process engine.
        p = 1.0 / (1.0 + np.exp(-np.minimum(np.maximum(z, -30.0), 30.0)))
        p[z < -30.0] = 0.0  # river's sigmoid saturates at ±30
        p[z > 30.0] = 1.0
        return p

    def threshold(self, mu: float, override: float | None = None) -> float:
        """Largest expected disagreement (1 - p) at which the tier still answers."""
        if override is not None:
            return override
        return self.defer_cost.disagreement + mu * self.defer_cost.cost

    def exploration(self) -> float:
        c = self.config
        return c.exploration_min + (c.exploration_max - c.exploration_min) * 0.5 ** (
            self.since_drift / c.exploration_halflife
        )

    # -- learning -------------------------------------------------------------------------
    def learn(self, features: np.ndarray, agree: Sequence[bool]) -> None:
        # Explored events are not up-weighted by 1 / exploration rate (inverse propensity): on
        # ISEAR the variance of those weights cost more accuracy than the bias they remove.
        # Python floats (tolist): river's dict arithmetic on them is a third faster than on numpy
        # scalars, with the same IEEE results.
        for row, ok in zip(features.tolist(), agree):
            self.model.learn_one(dict(enumerate(row)), bool(ok))
            before = self.adwin.estimation
            self.adwin.update(1.0 if ok else 0.0)
            # Only a drop in agreement means the tier got worse; a rise needs no extra exploration.
            if self.adwin.drift_detected and self.adwin.estimation < before:
                self.since_drift = 0
                self.drifts += 1
            else:
                self.since_drift += 1
            self.demonstrations += 1
        self.version = self.demonstrations
        self._weights = None

    @property
    def agreement(self) -> float:
        return float(self.adwin.estimation)

    # -- snapshots ------------------------------------------------------------------------
    _COUNTERS = ("demonstrations", "since_drift", "drifts")

    def _state(self) -> dict[str, Any]:
        return {
            "model": logistic_state(self.model),
            "adwin": adwin_state(self.adwin),
            **{name: getattr(self, name) for name in self._COUNTERS},
        }  # not defer_cost: it follows the routing of the stages above, wherever this policy runs

    def snapshot(self) -> bytes:
        return encode_snapshot(self.kind, self.version, {"tier": self.tier, **self._state()})

    def restore(self, blob: bytes) -> None:
        version, state = decode_snapshot(blob, self.kind)
        tier = field(state, "tier", str)
        if tier != self.tier:
            raise SnapshotError(f"snapshot of the policy of tier {tier!r} cannot restore that of {self.tier!r}")
        # Everything is read before anything is assigned: a refused snapshot changes nothing.
        model = logistic_from_state(field(state, "model", dict))
        adwin = adwin_from_state(field(state, "adwin", dict))
        counters = {name: count(state, name) for name in self._COUNTERS}
        self.model, self.adwin = model, adwin
        for name, value in counters.items():
            setattr(self, name, value)
        self.version = version
        self._weights = None
