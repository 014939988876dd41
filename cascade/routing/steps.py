"""The engine's steps, called by the in-process ``Cascade`` and by the Kafka workers alike, so the
decision logic lives once: route a batch through a stage; turn an LLM answer into a decision and
a demonstration; take and charge the LLM budget, with its fallback; price deferral.

An event in flight is a ``Deferred``: the event with what the tiers below said about it, what
it has cost so far and whether it is being explored. A fresh event is ``Deferred(event=e)``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cascade.deferral.policy import DeferralCost
from cascade.messages import Decision, Deferred, Demonstration, LLMAnswer, RoutingSnapshot
from cascade.routing.stage import Action, Stage, StageRouting
from cascade.state.interfaces import Budgets
from cascade.state.records import BudgetRequest, BudgetTake
from cascade.task import Task


def versions_of(item: Deferred) -> dict[str, int]:
    """The model versions of the tiers that saw an event: what its decision records."""
    return {o.tier: o.version for o in item.outputs}


@dataclass
class StageStep:
    """A stage's batch, split: the events it answered and those it passes up, by batch position."""

    routing: StageRouting
    answered: list[tuple[int, Decision]] = field(default_factory=list)
    # Passed up with this tier's output appended; ``explored`` ones go straight to the LLM.
    passed: list[tuple[int, Deferred]] = field(default_factory=list)


def route_stage(stage: Stage, items: Sequence[Deferred], now: float | None = None) -> StageStep:
    """Route a batch through one stage: answer what its policy accepts, pass the rest up."""
    routing = stage.route([d.event for d in items], [d.outputs[-1] if d.outputs else None for d in items])
    step = StageStep(routing)
    tier = stage.tier
    decided_at = time.time() if now is None else now  # passed in: pydantic calls default factories slowly
    for i, (d, action) in enumerate(zip(items, routing.actions)):
        cost = d.cost + tier.cost
        if action is Action.ANSWER:
            step.answered.append((i, Decision(
                event_id=d.event.id, label=routing.labels[i], tier=tier.name, confidence=routing.confidence[i],
                reason="tier", model_versions={**versions_of(d), tier.name: routing.version}, cost=cost,
                ts=decided_at,
            )))
        else:
            step.passed.append((i, Deferred(
                event=d.event, outputs=[*d.outputs, routing.output(i)],
                explored=d.explored or action is Action.EXPLORE, cost=cost, first_seen=d.first_seen,
                origin=d.origin,
            )))
    return step


def fallback_decision(
    task: Task, item: Deferred, reason: Literal["llm_unusable", "budget_exhausted"], cost: float | None = None,
) -> Decision:
    """No LLM answer to be had: the highest warm cheap tier's answer stands, marked with why."""
    versions = versions_of(item)
    cost = item.cost if cost is None else cost
    warm = [o for o in item.outputs if o.p_agree is not None]
    if not warm:
        return Decision(event_id=item.event.id, label=None, tier="llm", confidence=0.0, reason=reason,
                        explored=item.explored, model_versions=versions, cost=cost)
    best = warm[-1]
    label = best.label(task.labels)
    return Decision(event_id=item.event.id, label=label, tier=best.tier, confidence=best.probs[task.index[label]],
                    reason=reason, explored=item.explored, model_versions=versions, cost=cost)


class LLMStep:
    """The LLM's part of the cascade, whatever calls the LLM: budget takes before the calls, and
    each answer turned into a decision, a demonstration and a charge."""

    def __init__(self, task: Task, llm_name: str, budgets: Budgets, tenant: str = "default") -> None:
        self.task = task
        self.llm_name = llm_name
        self.budgets = budgets
        self.tenant = tenant

    def take_budget(self, n: int) -> list[BudgetTake]:
        """One budget take per intended call, in one round trip; each all-or-nothing, in order."""
        return self.budgets.take_budgets([BudgetRequest(self.tenant, 1, 0, 0.0) for _ in range(n)])

    def refund(self) -> None:
        """A call taken from the budget that never succeeded."""
        self.budgets.charge(self.tenant, calls=-1)

    def exhausted(self, item: Deferred) -> Decision:
        return fallback_decision(self.task, item, "budget_exhausted")

    def settle(self, item: Deferred, answer: LLMAnswer) -> tuple[Decision, Demonstration | None]:
        """An answer's decision, its demonstration (None when it maps to no label) and its charge."""
        if answer.tokens_in or answer.tokens_out or answer.cost:
            self.budgets.charge(self.tenant, tokens=answer.tokens_in + answer.tokens_out, money=answer.cost)
        cost = item.cost + answer.cost
        if answer.label is None:
            return fallback_decision(self.task, item, "llm_unusable", cost), None
        event = item.event
        decision = Decision(event_id=event.id, label=answer.label, tier="llm", confidence=1.0, reason="llm",
                            explored=item.explored, model_versions=versions_of(item), cost=cost)
        demo = Demonstration(event_id=event.id, text=event.text, llm=self.llm_name, llm_label=answer.label,
                             explored=item.explored)
        return decision, demo


def deferral_costs(chain: Sequence[RoutingSnapshot], llm_cost: float) -> list[DeferralCost]:
    """Per stage, the expected cost and disagreement of deferring, working down from the top.

    Deferring from a stage costs the next stage plus what that one defers; costs are in units
    of one LLM call; the disagreement is that of the answers the stages above give (the LLM
    agrees with itself). ``chain`` is every cheap stage's routing, in cascade order.
    """
    above = DeferralCost(cost=1.0, disagreement=0.0)
    out = []
    for s in reversed(chain):
        out.append(above)
        above = DeferralCost(
            cost=s.cost / llm_cost + (1.0 - s.answer_rate) * above.cost,
            disagreement=s.answer_rate * s.answered_disagreement + (1.0 - s.answer_rate) * above.disagreement,
        )
    return out[::-1]


def price_deferral(
    tiers: Sequence[tuple[str, float]], known: Mapping[str, RoutingSnapshot], llm_cost: float
) -> dict[str, DeferralCost]:
    """Each tier's deferral cost from the routing known of every tier (name, cost), in cascade order.

    In-process every stage's routing is known; a tier worker knows its own and what the other
    workers shared. A tier whose routing is unknown counts as deferring everything: the cautious
    assumption.
    """
    chain = [
        known.get(name) or RoutingSnapshot(tier=name, cost=cost, answer_rate=0.0, answered_disagreement=0.0)
        for name, cost in tiers
    ]
    return {name: c for (name, _), c in zip(tiers, deferral_costs(chain, llm_cost))}
