"""The in-process cascade: stages in order, the LLM for what is left, learning from its answers."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from cascade.config import CascadeConfig
from cascade.deferral.policy import DeferralCost, DeferralPolicy
from cascade.learning.learner import Learner
from cascade.messages import Decision, Demonstration, Event, LiveParams, RoutingSnapshot, TierOutput
from cascade.routing.stage import Action, Stage
from cascade.state import BudgetRequest, StateStore, cacheable, make_state
from cascade.state.keys import cache_keys
from cascade.task import Task
from cascade.tiers import registry
from cascade.tiers.base import Tier
from cascade.tiers.llm import LLMBackend, call_with_retries, make_backend


def build_tier(config: CascadeConfig, index: int) -> Tier:
    return registry.build_tier(config.tiers[index], config.task.labels, config.features)


def initial_params(config: CascadeConfig) -> LiveParams:
    return LiveParams(mu=config.deferral.mu, thresholds=dict(config.deferral.threshold_overrides))


def build_stage(config: CascadeConfig, index: int, params: LiveParams | None = None) -> Stage:
    """One tier and its policy; a tier worker builds only its own (and needs only its extras)."""
    tc = config.tiers[index]
    policy = DeferralPolicy(tc.name, config.deferral, warmup=tc.warmup_demonstrations)
    return Stage(build_tier(config, index), policy, params or initial_params(config),
                 seed=config.seed * 1000 + index, miss_costs=config.task.miss_costs)


def build_stages(config: CascadeConfig, params: LiveParams | None = None) -> list[Stage]:
    params = params or initial_params(config)
    return [build_stage(config, i, params) for i in range(len(config.tiers))]


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


def refresh_deferral_costs(stages: Sequence[Stage], llm_cost: float) -> None:
    for stage, cost in zip(stages, deferral_costs([s.routing() for s in stages], llm_cost)):
        stage.policy.defer_cost = cost


def fallback_decision(
    task: Task, event: Event, outputs: Sequence[TierOutput], cost: float,
    reason: Literal["llm_unusable", "budget_exhausted"], explored: bool,
) -> Decision:
    """No LLM answer to be had: the highest warm cheap tier's answer stands, marked with why."""
    versions = {o.tier: o.version for o in outputs}
    warm = [o for o in outputs if o.p_agree is not None]
    if not warm:
        return Decision(event_id=event.id, label=None, tier="llm", confidence=0.0, reason=reason,
                        explored=explored, model_versions=versions, cost=cost)
    best = warm[-1]
    label = best.label(task.labels)
    return Decision(event_id=event.id, label=label, tier=best.tier, confidence=best.probs[task.index[label]],
                    reason=reason, explored=explored, model_versions=versions, cost=cost)


@dataclass
class Outcome:
    event: Event
    decision: Decision
    demonstration: Demonstration | None = None
    outputs: list[TierOutput] = field(default_factory=list)


class Cascade:
    def __init__(self, config: CascadeConfig, llm: LLMBackend | None = None, state: StateStore | None = None) -> None:
        self.config = config
        # The embedded default is the in-process store; pass a RedisState to share a deployment's.
        self.state = state if state is not None else make_state(config)
        self.task = Task(config.task)
        self.params = initial_params(config)
        self.stages = build_stages(config, self.params)
        self.learner = Learner(self.stages)
        self.llm = llm or make_backend(self.task, config.llm)
        self.rng = random.Random(config.seed)

    def set_params(self, params: LiveParams) -> None:
        self.params = params
        for stage in self.stages:
            stage.params = params

    def model_versions(self) -> dict[str, int]:
        return {s.tier.name: s.tier.version for s in self.stages}

    def process(self, events: Sequence[Event]) -> list[Outcome]:
        """Answer a batch: cheap tiers first, the LLM for the rest, then learn from the LLM."""
        n = len(events)
        outputs: list[list[TierOutput]] = [[] for _ in range(n)]
        known: list[dict[str, tuple[TierOutput, Any]]] = [{} for _ in range(n)]
        costs = [0.0] * n
        decisions: list[Decision | None] = [None] * n
        explored = [False] * n
        versions = self.model_versions()
        keys = cache_keys(self.task.name, self.task.labels, [e.text for e in events])
        pending = []
        for i, hit in enumerate(self.state.get_decisions(keys, [e.id for e in events])):
            if hit is not None:  # answered before any tier runs
                decisions[i] = hit
            else:
                pending.append(i)
        for stage in self.stages:
            if not pending:
                break
            routed = stage.route([events[i] for i in pending], [outputs[i][-1] if outputs[i] else None for i in pending])
            still = []
            for i, r in zip(pending, routed):
                outputs[i].append(r.output)
                known[i][stage.tier.name] = (r.output, r.tier_input)
                costs[i] += stage.tier.cost
                if r.action is Action.ANSWER:
                    decisions[i] = Decision(
                        event_id=events[i].id, label=r.label, tier=stage.tier.name, confidence=r.confidence,
                        reason="tier", model_versions=versions, cost=costs[i],
                    )
                elif r.action is Action.EXPLORE:
                    explored[i] = True
                else:
                    still.append(i)
            pending = still
        to_llm = self._take_budget(events, [i for i in range(n) if decisions[i] is None], outputs, costs, decisions, explored)
        demos = self._ask_llm(events, to_llm, outputs, costs, decisions, explored, versions)
        self.state.put_decisions(
            (keys[i], d) for i, d in enumerate(decisions)
            if d is not None and cacheable(d, self.config.state.cache_cheap_answers)
        )
        if demos:
            idx = [i for i, _ in demos]
            self.learner.learn([events[i] for i in idx], [d.llm_label for _, d in demos], [known[i] for i in idx])
        refresh_deferral_costs(self.stages, self.config.llm.cost)
        demo_at = dict(demos)
        return [
            Outcome(events[i], decisions[i], demo_at.get(i), outputs[i])  # type: ignore[arg-type]
            for i in range(n)
        ]

    def _take_budget(
        self, events: Sequence[Event], wanted: list[int], outputs: list[list[TierOutput]], costs: list[float],
        decisions: list[Decision | None], explored: list[bool],
    ) -> list[int]:
        """The events the LLM budget allows; the rest keep the best cheap answer (budget_exhausted).

        In-process there is nowhere to hold an event, so ``budget.on_exhausted: hold`` applies
        to the Kafka LLM worker only.
        """
        takes = self.state.take_budgets([BudgetRequest("default", 1, 0, 0.0) for _ in wanted])
        allowed = []
        for i, take in zip(wanted, takes):
            if take.allowed:
                allowed.append(i)
            else:
                decisions[i] = fallback_decision(self.task, events[i], outputs[i], costs[i], "budget_exhausted", explored[i])
        return allowed

    def _ask_llm(
        self,
        events: Sequence[Event],
        to_llm: list[int],
        outputs: list[list[TierOutput]],
        costs: list[float],
        decisions: list[Decision | None],
        explored: list[bool],
        versions: dict[str, int],
    ) -> list[tuple[int, Demonstration]]:
        if not to_llm:
            return []
        answers = call_with_retries(
            lambda: self.llm.answer([events[i] for i in to_llm]),
            self.config.llm.max_retries, self.config.llm.retry_backoff_s, self.rng,
        )
        demos = []
        for i, ans in zip(to_llm, answers):
            costs[i] += ans.cost
            if ans.tokens_in or ans.tokens_out or ans.cost:
                self.state.charge("default", tokens=ans.tokens_in + ans.tokens_out, money=ans.cost)
            if ans.label is not None:
                decisions[i] = Decision(
                    event_id=events[i].id, label=ans.label, tier="llm", confidence=1.0, reason="llm",
                    explored=explored[i], model_versions=versions, cost=costs[i],
                )
                demos.append((i, Demonstration(
                    event_id=events[i].id, text=events[i].text, llm=self.llm.name, llm_label=ans.label,
                    explored=explored[i],
                )))
            else:
                decisions[i] = fallback_decision(self.task, events[i], outputs[i], costs[i], "llm_unusable", explored[i])
        return demos
