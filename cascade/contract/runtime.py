"""The contract in the engine: the per-batch steps that tie audits, the estimator and the controller
to the stages. The in-process ``Cascade`` calls them; a worker that sees the same things (a tier
worker its stage's routing, the LLM worker every LLM answer and audit) calls the same methods.

Per batch:

* ``observe(routing)`` - a stage scored a batch: the controller samples its risk scores.
* ``draw_audits(routing, answered)`` - which of the events the stage answered are also asked of the
  LLM (:class:`AuditSampler`: a hash of the id, independent of the policy).
* ``record(decision)`` - a delivered decision: the estimator counts who answered it.
* ``record_audit(audit, llm_label)`` - the LLM's answer to an audit: the estimator and the
  controller's calibration learn whether the tier agreed.
* ``record_tally(tally)`` - in the Kafka deployment, what a tier worker answered and scored since
  its previous audit (``TierTally`` there), carried by the audit to the LLM worker, which runs the
  estimator and the controller and writes the thresholds into the live parameters.
* ``control(params, costs)`` - every ``update_every`` delivered decisions, new live parameters
  (per-tier thresholds, exploration scale) from the controller.

Fallback decisions (``budget_exhausted``, ``llm_unusable``) are outside the estimate: the LLM did
not answer them and no audit measures them, so neither the LLM's share nor a tier's applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

from cascade.config import CascadeConfig
from cascade.contract.audit import AuditSampler
from cascade.contract.controller import ContractController, ControlOutput
from cascade.contract.estimator import AgreementEstimate, AgreementEstimator
from cascade.logging import get_logger
from cascade.messages import ContractTally, Decision, LiveParams
from cascade.routing.stage import StageRouting

log = get_logger("cascade.contract")


@dataclass(frozen=True)
class Audit:
    """A cheap answer also asked of the LLM: the tier, its label and what its policy predicted."""

    tier: str
    label: str
    p_agree: float


def draw_audits(
    sampler: AuditSampler, routing: StageRouting, answered: Sequence[int], event_ids: Sequence[str]
) -> list[Audit | None]:
    """Per answered batch position (``answered``), its audit or None; ``event_ids`` by batch position."""
    if routing.p_agree is None or not answered:  # a cold tier answers nothing
        return [None] * len(answered)
    drawn = sampler.draw_batch([event_ids[j] for j in answered])
    return [Audit(routing.tier, routing.labels[j], routing.p_agree[j]) if hit else None
            for j, hit in zip(answered, drawn.tolist(), strict=True)]


class TierTally:
    """A tier worker's part: draws the audits among its answers and tallies, for the next audit to
    carry, what it answered and scored (the most recent ``keep`` scores: the controller samples them)."""

    def __init__(self, config: CascadeConfig, tier: str, keep: int = 2000) -> None:
        self.sampler = AuditSampler(config.contract.audit_rate, config.contract.audit_salt)
        self.tier = tier
        self.keep = keep
        self.answered = 0
        self.risk: list[float] = []
        self.p_agree: list[float] = []

    def observe(self, routing: StageRouting, answered: Sequence[int], event_ids: Sequence[str]) -> list[Audit | None]:
        self.answered += len(answered)
        if routing.risk is not None and routing.p_agree is not None:
            self.risk = (self.risk + routing.risk)[-self.keep:]
            self.p_agree = (self.p_agree + routing.p_agree)[-self.keep:]
        return draw_audits(self.sampler, routing, answered, event_ids)

    def take(self) -> ContractTally:
        """The tally so far, for an audit to carry; counting starts again."""
        tally = ContractTally(tier=self.tier, answered=self.answered, risk=self.risk, p_agree=self.p_agree)
        self.answered, self.risk, self.p_agree = 0, [], []
        return tally


class ContractStatus(BaseModel):
    """The contract at the end of a run, for reports: targets, the estimate and the budget's say."""

    min_agreement: float | None
    max_llm_fraction: float | None
    alpha: float
    audit_rate: float
    audits_measured: int  # audits whose LLM answer had a label (what the bound rests on)
    estimated_agreement: float
    agreement_lower_bound: float
    window_estimated_agreement: float
    window_agreement_lower_bound: float
    contract_met: bool | None  # windowed bound >= min_agreement at the last update (None: no target)
    budget_binding: bool  # at the last update
    budget_binding_updates: int  # controller updates at which the budget overruled the agreement target
    budget_binding_reason: str | None  # the last time it did
    thresholds: dict[str, float]
    exploration_scale: float


class Contract:
    """Audits, the agreement estimator and the controller of one cascade (see the module docstring)."""

    def __init__(self, config: CascadeConfig, tiers: Sequence[str]) -> None:
        c = config.contract
        self.config = c
        self.sampler = AuditSampler(c.audit_rate, c.audit_salt)
        self.estimator = AgreementEstimator(
            list(tiers), alpha=c.alpha, window_events=c.window_events, window_audits=c.window_audits
        )
        self.controller = ContractController(
            list(tiers), min_agreement=c.min_agreement, max_llm_fraction=c.max_llm_fraction,
            audit_rate=c.audit_rate, score_sample=c.score_window, score_keep=1.0, seed=config.seed,
        )
        self.tiers = set(tiers)
        self.since_update = 0
        self.last: ControlOutput | None = None
        self.binding_updates = 0
        self.binding_reason: str | None = None

    def observe(self, routing: StageRouting) -> None:
        if routing.risk is not None and routing.p_agree is not None:
            self.controller.observe_scores(routing.tier, np.asarray(routing.risk), np.asarray(routing.p_agree))

    def draw_audits(self, routing: StageRouting, answered: Sequence[int], event_ids: Sequence[str]) -> list[Audit | None]:
        return draw_audits(self.sampler, routing, answered, event_ids)

    def record(self, decision: Decision) -> None:
        """A delivered decision (a cache hit counts as whoever answered it first)."""
        if decision.reason in ("llm", "tier", "cache"):
            if decision.tier == "llm":
                self.estimator.record_llm()
            elif decision.tier in self.tiers:
                self.estimator.record_cheap(decision.tier)
        self.since_update += 1

    def record_tally(self, tally: ContractTally) -> None:
        """A tier worker's answers and scores since its previous audit (see ``TierTally``)."""
        if tally.tier not in self.tiers:
            return
        if tally.answered:
            self.estimator.record_cheap(tally.tier, tally.answered)
            self.since_update += tally.answered
        if tally.risk:
            self.controller.observe_scores(tally.tier, np.asarray(tally.risk), np.asarray(tally.p_agree))

    def record_audit(self, audit: Audit, llm_label: str) -> None:
        agreed = llm_label == audit.label
        self.estimator.record_audit(audit.tier, agreed)
        self.controller.observe_audits(audit.tier, np.array([audit.p_agree]), np.array([agreed]))

    def control(self, params: LiveParams, costs: Mapping[str, float]) -> LiveParams | None:
        """New live parameters every ``update_every`` decisions (else None). ``costs``: per tier, the
        LLM calls one of its answers saves (``DeferralCost.cost``)."""
        if self.since_update < self.config.update_every:
            return None
        self.since_update = 0
        for tier, calls in costs.items():
            self.controller.set_cost(tier, calls)
        out = self.controller.update(self.estimator.estimate())
        if out.budget_binding:
            self.binding_updates += 1
            self.binding_reason = out.reason
            if self.last is None or not self.last.budget_binding:  # loud once per episode, not per update
                log.warning("contract_budget_binding", reason=out.reason, thresholds=out.thresholds)
        self.last = out
        # Tiers the controller has no scores for yet keep the mu rule (no threshold).
        return params.model_copy(update={"thresholds": out.thresholds, "exploration_scale": out.exploration_scale})

    def estimate(self) -> AgreementEstimate:
        return self.estimator.estimate()

    def status(self) -> ContractStatus:
        e, last, c = self.estimate(), self.last, self.config
        return ContractStatus(
            min_agreement=c.min_agreement, max_llm_fraction=c.max_llm_fraction, alpha=c.alpha,
            audit_rate=c.audit_rate, audits_measured=e.audit_calls,
            estimated_agreement=e.estimated_agreement, agreement_lower_bound=e.agreement_lower_bound,
            window_estimated_agreement=e.window_estimated_agreement, window_agreement_lower_bound=e.window_lower_bound,
            contract_met=None if last is None else last.contract_met,
            budget_binding=bool(last and last.budget_binding), budget_binding_updates=self.binding_updates,
            budget_binding_reason=self.binding_reason,
            thresholds={} if last is None else last.thresholds,
            exploration_scale=1.0 if last is None else last.exploration_scale,
        )
