"""The contract controller: per-tier deferral thresholds that hold ``min_agreement`` or an LLM budget.

Design. Delivered agreement is ``1 - sum_t reach_t * D_t(tau_t)``: tier ``t`` sees the share
``reach_t`` of the events, answers those with risk ``<= tau_t`` and disagrees with the LLM on
``D_t`` of what it sees. Fewest LLM calls for a given agreement is a knapsack whose Lagrangian
answers an event when its expected disagreement is at most ``lam`` times the LLM calls answering
it saves - the rule the policy already has (``defer_disagreement + mu * defer_cost``). So the
controller turns **one global knob** ``lam`` (equal marginal disagreement per call saved in every
tier, which is what makes the mix cheapest; per-tier targets would need an arbitrary split of the
disagreement budget) and emits it as per-tier thresholds ``tau_t = lam * cost_t / kappa_t``.

It does not random-walk ``lam``. The policy gives ``p_agree`` for every event a tier sees, so
from a recent sample of (risk, 1 - p_agree) per tier the controller *predicts* answered share and
disagreement for any ``lam`` and picks, by bisection, the loosest one meeting the target:

* **Calibration** ``kappa_t`` = audited disagreements / the policy's predicted disagreement on the
  same audits (last ``calibration_audits`` audits, prior ``calibration_prior``/1: a young tier is
  taken to disagree three times as often as its policy predicts until audits show otherwise -
  with the even prior 1/1, isear's first 2,000 events ran at 0.87-0.88 agreement while too few
  audits had come in to show it, and 7 of 20 shuffled runs ended under a 0.95 target). The
  audits are a uniform sample of what the tier answers (:mod:`cascade.contract.audit`), so this
  corrects the policy's bias where the tier answers; beyond the current threshold it extrapolates the policy's ``p`` scaled by
  ``kappa_t`` - the feedback below catches what that misses.
* **Margin** for the guarantee: the contract is that the windowed *lower confidence bound*
  (:mod:`cascade.contract.estimator`) stays ``>= min_agreement``, so the predicted agreement aims
  at ``min_agreement + width + boost`` where ``width`` = windowed estimate - windowed bound (at
  most ``margin_cap``, so a cold start with few audits still lets tiers answer and earn audits).
* **Feedback** ``boost``: when the windowed bound is below the target (and informative) it grows
  at once by the shortfall (once per ``cooldown_audits``, so the lagging bound can show the effect
  before tightening again); while the bound is above target it halves every ``loosen_halflife``
  audits. Fast tighten, slow loosen.
* **Drift**: ADWIN per tier on the audit residual ``disagree - kappa_t (1 - p_agree)``. A rise (the tier
  got worse than its policy thinks) drops the calibration audits from before the change, sets
  ``boost >= margin_cap`` and raises the exploration scale to 1, decaying back to
  ``exploration_base`` with half-life ``exploration_halflife`` audits. The bound dipping below
  target tightens but does not raise exploration: in steady state it dips by design.

Dual ascent would need many noisy steps to find ``lam``; conformal risk control on the audits
would only certify thresholds the tier already answers at (audits never see events it defers).
The prediction finds the threshold in one step and the bound keeps it honest.

``max_llm_fraction`` ``F`` counts LLM calls (answers plus audits) per event. The controller picks
the smallest ``lam`` (best agreement) whose predicted fraction is ``<= F - bias``, ``bias`` being
an integral of the observed minus target fraction (exploration and the reach model's errors).
With both, the budget wins: if the agreement target needs more calls than ``F``, the budget's
threshold is used and ``budget_binding`` is set with a reason.

API::

    ctl = ContractController(["logistic", "onnx"], min_agreement=0.95, max_llm_fraction=None)
    ctl.observe_scores("logistic", risk, p_agree)   # arrays: every event the tier scored (batch)
    ctl.observe_audits("logistic", p_agree, agree)  # arrays: the tier's audited answers
    ctl.set_cost("logistic", calls)                 # LLM calls one answer saves (DeferralCost.cost)
    out = ctl.update(estimator.estimate())          # ControlOutput
    LiveParams(mu=..., thresholds=out.thresholds, exploration_scale=out.exploration_scale)
    state = ctl.snapshot(); ContractController.from_snapshot(state)  # JSON-able; ADWIN starts fresh

Tiers with no scores yet get no threshold (the engine's ``mu`` rule applies to them). ``tiers``
are in cascade order, cheapest first: a tier sees what the tiers before it defer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from river import drift

from cascade.contract.estimator import AgreementEstimate


class _Ring:
    """Fixed-size ring of rows of floats (most recent kept)."""

    def __init__(self, size: int, width: int) -> None:
        self.data = np.zeros((size, width))
        self.filled = 0
        self.pos = 0

    def add(self, rows: np.ndarray) -> None:
        size = len(self.data)
        rows = rows[-size:]
        n = len(rows)
        end = self.pos + n
        if end <= size:
            self.data[self.pos : end] = rows
        else:
            cut = size - self.pos
            self.data[self.pos :] = rows[:cut]
            self.data[: n - cut] = rows[cut:]
        self.pos = end % size
        self.filled = min(size, self.filled + n)

    def rows(self) -> np.ndarray:
        return self.data[: self.filled] if self.filled < len(self.data) else self.data

    def keep_last(self, n: int) -> None:
        last = np.roll(self.data, -self.pos, axis=0)[-min(n, self.filled) :] if n > 0 else self.data[:0]
        self.data[:] = 0.0
        self.filled = self.pos = 0
        self.add(last)


@dataclass(frozen=True)
class ControlOutput:
    thresholds: dict[str, float]  # for LiveParams.thresholds (risk at or below answers)
    exploration_scale: float  # for LiveParams.exploration_scale
    budget_binding: bool  # the agreement target needs more LLM calls than the budget allows
    reason: str
    contract_met: bool | None  # windowed lower bound >= min_agreement (None without that target)
    lagrange: float  # the global knob lam
    target_agreement: float | None  # what the prediction aimed at: min_agreement + margin
    predicted_agreement: float
    predicted_llm_fraction: float  # LLM calls (answers + audits) per event
    calibration: dict[str, float] = field(default_factory=dict)  # kappa per tier

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ContractController:
    def __init__(
        self,
        tiers: list[str],
        *,
        min_agreement: float | None = None,
        max_llm_fraction: float | None = None,
        audit_rate: float = 0.03,
        score_sample: int = 4096,
        score_keep: float = 0.05,
        calibration_audits: int = 2000,
        margin_cap: float | None = None,
        cooldown_audits: int = 250,
        calibration_prior: float = 3.0,
        loosen_halflife: float = 2000.0,
        drift_delta: float = 0.002,
        exploration_base: float = 0.5,
        exploration_halflife: float = 2000.0,
        seed: int = 0,
    ) -> None:
        if min_agreement is None and max_llm_fraction is None:
            raise ValueError("give min_agreement, max_llm_fraction or both")
        if min_agreement is not None and not 0 < min_agreement < 1:
            raise ValueError("min_agreement must be in (0, 1)")
        if max_llm_fraction is not None and not 0 <= max_llm_fraction <= 1:
            raise ValueError("max_llm_fraction must be in [0, 1]")
        self.tiers = list(tiers)
        self.min_agreement = min_agreement
        self.max_llm_fraction = max_llm_fraction
        self.audit_rate = audit_rate
        self.score_keep = score_keep
        self.calibration_audits = calibration_audits
        # Default: half the disagreement the target allows.
        self.margin_cap = margin_cap if margin_cap is not None else 0.5 * (1.0 - (min_agreement or 0.0))
        self.cooldown_audits = cooldown_audits
        self.calibration_prior = calibration_prior
        self.loosen_halflife = loosen_halflife
        self.drift_delta = drift_delta
        self.exploration_base = exploration_base
        self.exploration_halflife = exploration_halflife
        self.rng = np.random.default_rng(seed)
        self.costs = dict.fromkeys(self.tiers, 1.0)
        self.scores = {t: _Ring(score_sample, 2) for t in self.tiers}  # (risk, 1 - p_agree)
        self.audits = {t: _Ring(calibration_audits, 2) for t in self.tiers}  # (1 - p_agree, disagreed)
        self.adwin = {t: drift.ADWIN(delta=drift_delta) for t in self.tiers}
        self.boost = 0.0
        self.fraction_bias = 0.0
        self.audits_seen = 0
        self.audits_at_update = 0
        self.audits_at_tighten = -cooldown_audits
        self.audits_at_drift: int | None = None
        self.drifts = 0

    # -- inputs ---------------------------------------------------------------------------
    def set_cost(self, tier: str, calls: float) -> None:
        """LLM calls one answer of ``tier`` saves (the policy's ``DeferralCost.cost``)."""
        self.costs[tier] = max(calls, 1e-6)

    def observe_scores(self, tier: str, risk: np.ndarray, p_agree: np.ndarray) -> None:
        """A batch the tier scored, answered or not; a random ``score_keep`` of it is sampled."""
        keep = self.rng.random(len(risk)) < self.score_keep
        if keep.any():
            # Filled by hand: np.column_stack's dispatch cost more than the rest of this per event.
            rows = np.empty((int(keep.sum()), 2))
            rows[:, 0] = np.asarray(risk)[keep]
            rows[:, 1] = 1.0 - np.asarray(p_agree)[keep]
            self.scores[tier].add(rows)

    def observe_audits(self, tier: str, p_agree: np.ndarray, agree: np.ndarray) -> None:
        """The tier's audited answers: the policy's ``p_agree`` for each and whether the LLM agreed."""
        q = 1.0 - np.asarray(p_agree, dtype=float)
        disagreed = 1.0 - np.asarray(agree, dtype=float)
        if not len(q):
            return
        # Residual against the calibrated prediction: mean zero whatever mix of events the
        # threshold lets through, so moving the threshold is not mistaken for drift.
        kappa = self.calibration(tier)
        self.audits[tier].add(np.column_stack([q, disagreed]))
        self.audits_seen += len(q)
        detector = self.adwin[tier]
        for residual in (disagreed - kappa * q).tolist():
            before = detector.estimation
            detector.update(residual)
            if detector.drift_detected and detector.estimation > before:
                self._drift(tier, int(detector.width))

    def _drift(self, tier: str, post_change: int) -> None:
        self.audits[tier].keep_last(post_change)
        self.boost = max(self.boost, self.margin_cap)
        self.audits_at_drift = self.audits_seen
        self.drifts += 1

    # -- prediction -----------------------------------------------------------------------
    def calibration(self, tier: str) -> float:
        rows = self.audits[tier].rows()
        return (self.calibration_prior + float(rows[:, 1].sum())) / (1.0 + float(rows[:, 0].sum()))

    def _curves(self) -> list[tuple[str, np.ndarray, np.ndarray, float, float]]:
        """Per tier with scores: sorted risks, prefix sums of 1 - p in that order, kappa, cost."""
        curves = []
        for t in self.tiers:
            rows = self.scores[t].rows()
            if not len(rows):
                continue
            order = np.argsort(rows[:, 0], kind="stable")
            prefix = np.concatenate([[0.0], np.cumsum(rows[order, 1])])
            curves.append((t, rows[order, 0], prefix, self.calibration(t), self.costs[t]))
        return curves

    def _predict(self, curves: list, lam: float) -> tuple[float, float, dict[str, float]]:
        """(agreement, LLM calls per event, thresholds) at knob ``lam``; tiers in cascade order."""
        disagreement, reach, thresholds = 0.0, 1.0, {}
        cheap = 0.0
        for tier, risks, prefix, kappa, cost in curves:
            tau = lam * cost / kappa
            i = int(np.searchsorted(risks, tau, side="right"))
            answered = i / len(risks)
            disagreement += reach * min(kappa * prefix[i] / len(risks), answered)
            cheap += reach * answered
            reach *= 1.0 - answered
            thresholds[tier] = tau
        return 1.0 - disagreement, reach + self.audit_rate * cheap, thresholds

    def _solve(self, curves: list, ok: Any, want_large: bool) -> float:
        """Bisection for the largest (or smallest) lam in range with ``ok(lam)``."""
        hi = max(risks[-1] * kappa / cost for _, risks, _, kappa, cost in curves) * (1 + 1e-9) + 1e-12
        lo = 0.0
        if want_large:
            if ok(hi):
                return hi
            if not ok(lo):
                return lo
            for _ in range(50):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if ok(mid) else (lo, mid)
            return lo
        if ok(lo):
            return lo
        if not ok(hi):
            return hi
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
        return hi

    # -- control --------------------------------------------------------------------------
    def _feedback(self, estimate: AgreementEstimate) -> tuple[float, bool | None]:
        """Move ``boost`` on the windowed bound; return the margin width and whether the contract holds."""
        new_audits = self.audits_seen - self.audits_at_update
        self.audits_at_update = self.audits_seen
        if self.min_agreement is None:
            return 0.0, None
        lb = estimate.window_lower_bound
        width = max(0.0, estimate.window_estimated_agreement - lb)
        met = lb >= self.min_agreement
        informative = width <= self.margin_cap  # else the bound is mostly audit noise: no feedback
        if not met and informative and self.audits_seen - self.audits_at_tighten >= self.cooldown_audits:
            self.boost = min(self.margin_cap, self.boost + self.min_agreement - lb)
            self.audits_at_tighten = self.audits_seen
        elif met:
            self.boost *= 0.5 ** (new_audits / self.loosen_halflife)
        return min(width, self.margin_cap), met

    def _exploration(self) -> float:
        if self.audits_at_drift is None:
            return self.exploration_base
        since = self.audits_seen - self.audits_at_drift
        return self.exploration_base + (1.0 - self.exploration_base) * 0.5 ** (since / self.exploration_halflife)

    def update(self, estimate: AgreementEstimate) -> ControlOutput:
        width, met = self._feedback(estimate)
        curves = self._curves()
        calibration = {t: kappa for t, _, _, kappa, _ in curves}
        if not curves:
            return ControlOutput({}, self._exploration(), False, "no scores yet", met, 0.0, None, 1.0, 1.0, {})
        target = None if self.min_agreement is None else min(1.0, self.min_agreement + width + self.boost)
        lam_quality = None
        if target is not None:
            lam_quality = self._solve(curves, lambda lam: self._predict(curves, lam)[0] >= target, want_large=True)
        lam_budget = None
        if self.max_llm_fraction is not None:
            if estimate.events:
                observed = estimate.window_llm_share + self.audit_rate * (1.0 - estimate.window_llm_share)
                # Small gain: the windowed share lags by up to a window; a fast integral winds up.
                self.fraction_bias = float(
                    np.clip(self.fraction_bias + 0.01 * (observed - self.max_llm_fraction), -0.1, 0.1)
                )
            cap = self.max_llm_fraction - self.fraction_bias
            lam_budget = self._solve(curves, lambda lam: self._predict(curves, lam)[1] <= cap, want_large=False)
        binding, reason = False, "min_agreement" if lam_budget is None else "max_llm_fraction"
        if lam_quality is None:
            lam = lam_budget
        elif lam_budget is None or lam_quality >= lam_budget:
            lam = lam_quality
            reason = "min_agreement" if lam_budget is None else "min_agreement within the budget"
        else:
            lam, binding = lam_budget, True
            need = self._predict(curves, lam_quality)[1]
            reason = (
                f"min_agreement {self.min_agreement} needs ~{need:.3f} LLM calls per event, "
                f"over max_llm_fraction {self.max_llm_fraction}: the budget wins"
            )
        assert lam is not None  # one of the two targets is set (checked in __init__)
        agreement, fraction, thresholds = self._predict(curves, lam)
        return ControlOutput(
            thresholds={t: float(tau) for t, tau in thresholds.items()},
            exploration_scale=self._exploration(),
            budget_binding=binding,
            reason=reason,
            contract_met=met,
            lagrange=float(lam),
            target_agreement=target,
            predicted_agreement=float(agreement),
            predicted_llm_fraction=float(fraction),
            calibration=calibration,
        )

    # -- snapshots ------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """JSON-able state; the drift detectors are not in it (they restart empty)."""
        def ring(r: _Ring) -> list[list[float]]:
            return np.roll(r.data, -r.pos, axis=0)[-r.filled :].tolist() if r.filled else []

        return {
            "tiers": self.tiers,
            "config": {
                "min_agreement": self.min_agreement,
                "max_llm_fraction": self.max_llm_fraction,
                "audit_rate": self.audit_rate,
                "score_sample": len(next(iter(self.scores.values())).data),
                "score_keep": self.score_keep,
                "calibration_audits": self.calibration_audits,
                "margin_cap": self.margin_cap,
                "cooldown_audits": self.cooldown_audits,
                "calibration_prior": self.calibration_prior,
                "loosen_halflife": self.loosen_halflife,
                "drift_delta": self.drift_delta,
                "exploration_base": self.exploration_base,
                "exploration_halflife": self.exploration_halflife,
            },
            "costs": dict(self.costs),
            "scores": {t: ring(r) for t, r in self.scores.items()},
            "audits": {t: ring(r) for t, r in self.audits.items()},
            "boost": self.boost,
            "fraction_bias": self.fraction_bias,
            "audits_seen": self.audits_seen,
            "audits_at_update": self.audits_at_update,
            "audits_at_tighten": self.audits_at_tighten,
            "audits_at_drift": self.audits_at_drift,
            "drifts": self.drifts,
        }

    @classmethod
    def from_snapshot(cls, state: dict[str, Any], seed: int = 0) -> ContractController:
        ctl = cls(state["tiers"], seed=seed, **state["config"])
        ctl.costs = {t: float(c) for t, c in state["costs"].items()}
        for t in ctl.tiers:
            for ring, rows in ((ctl.scores[t], state["scores"][t]), (ctl.audits[t], state["audits"][t])):
                if rows:
                    ring.add(np.asarray(rows, dtype=float))
        ctl.boost, ctl.fraction_bias = float(state["boost"]), float(state["fraction_bias"])
        ctl.audits_seen, ctl.audits_at_update = int(state["audits_seen"]), int(state["audits_at_update"])
        ctl.audits_at_tighten, ctl.drifts = int(state["audits_at_tighten"]), int(state["drifts"])
        ctl.audits_at_drift = state["audits_at_drift"]
        return ctl

