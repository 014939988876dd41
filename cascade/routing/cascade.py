"""The in-process cascade: the engine's steps run one after the other in one process.

Stages in order answer what their policies accept; the LLM answers the rest within the budget;
the tiers and policies learn from the LLM's answers. Unless a fixed price is configured, the
quality contract (``cascade.contract.runtime``) audits a share of the cheap answers and sets the
tiers' thresholds. The Kafka workers run the same steps
(``cascade.routing.steps``), one stage per consumer group.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

from cascade.config import CascadeConfig
from cascade.contract.runtime import Audit, Contract
from cascade.learning.learner import Learner
from cascade.messages import Decision, Deferred, Demonstration, Event, LiveParams, TierOutput
from cascade.routing.build import build_stages, initial_params
from cascade.routing.steps import LLMStep, price_deferral, route_stage
from cascade.state import StateStore, cacheable, make_state
from cascade.state.keys import cache_keys
from cascade.task import Task
from cascade.tiers.base import Tier
from cascade.tiers.llm import LLMBackend, call_with_retries, make_backend


@dataclass
class CascadeStep:
    """A batch through the cascade, by batch position: each event's decision, what every tier
    that saw it said (in cascade order), and the LLM's demonstration where it answered."""

    decisions: list[Decision]
    outputs: list[list[TierOutput]]
    demonstrations: list[Demonstration | None]  # the LLM's answer, or its audit of a cheap answer
    audit_calls: int = 0  # LLM calls spent on audits (their decisions stay the tiers')


@dataclass
class _Routed:
    """The cheap part of a batch: decisions where a tier or the cache answered, None where the
    LLM is needed; the event as it left the tiers; what each tier computed (for learning)."""

    decisions: list[Decision | None]
    items: list[Deferred]
    outputs: list[list[TierOutput]]
    known: list[dict[str, tuple[TierOutput, Any]]]
    keys: list[str]
    audits: dict[int, Audit]  # cheap answers drawn for an audit, by batch position


class Cascade:
    """The cascade in one process.

    >>> from cascade import Cascade, Event, load_config
    >>> config = load_config(None, task={"labels": ["pos", "neg"]}, llm={"name": "teacher"})
    >>> event = Event(id="1", text="what a lovely day", payload={"llm": {"teacher": "pos"}})
    >>> with Cascade(config) as cascade:
    ...     [decision] = cascade.process([event])
    >>> decision.label, decision.tier, decision.reason
    ('pos', 'llm', 'llm')

    ``process`` routes, asks the LLM and learns in one call. To label with something else, or
    learn from labels that arrive later, call ``route`` (cheap tiers and cache only) and
    ``learn`` when the labels come.
    """

    def __init__(
        self, config: CascadeConfig, *, tiers: Sequence[Tier] | None = None, llm: LLMBackend | None = None,
        state: StateStore | None = None,
    ) -> None:
        self.config = config
        # The embedded default is the in-process store; pass a RedisState to share a deployment's.
        self.state = state if state is not None else make_state(config)
        self.task = Task(config.task)
        self.params = initial_params(config)
        self.stages = build_stages(config, self.params, tiers)
        self.learner = Learner(self.stages)
        self.llm = llm or make_backend(self.task, config.llm)
        self.llm_step = LLMStep(self.task, self.llm.name, self.state)
        self.rng = random.Random(config.seed)
        self.contract = Contract(config, [s.tier.name for s in self.stages]) if config.contract_on else None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.state.close()

    def set_params(self, params: LiveParams) -> None:
        self.params = params
        for stage in self.stages:
            stage.params = params

    def model_versions(self) -> dict[str, int]:
        return {s.tier.name: s.tier.version for s in self.stages}

    def route(self, events: Sequence[Event]) -> list[Decision | Deferred]:
        """The cache and the cheap tiers only: a decision where they answered, else the event as it
        left the tiers (a ``Deferred``), for the LLM or any labeller; learn its label with ``learn``.
        The contract audits and steers in ``process``/``step`` only, where the LLM is at hand."""
        routed = self._route(events)
        return [d if d is not None else item for d, item in zip(routed.decisions, routed.items)]

    def learn(self, events: Sequence[Event], labels: Sequence[str]) -> None:
        """Learn (event, LLM label) pairs whenever the labels arrive."""
        self.learner.learn(events, labels)
        self._price_deferral()

    def process(self, events: Sequence[Event]) -> list[Decision]:
        """Answer a batch: cheap tiers first, the LLM for the rest, then learn from the LLM."""
        return self.step(events).decisions

    def step(self, events: Sequence[Event]) -> CascadeStep:
        """``process``, with what every tier said and the demonstrations (for evaluation)."""
        routed = self._route(events)
        decisions, items = routed.decisions, routed.items
        demos: list[Demonstration | None] = [None] * len(events)
        # Budget takes in order: the events that need the LLM first, then the audits, which only
        # measure (an audit the budget refuses is skipped; its decision is the tier's already).
        wanted = [i for i, d in enumerate(decisions) if d is None] + sorted(routed.audits)
        # In-process there is nowhere to hold an event, so ``budget.on_exhausted: hold`` applies
        # to the Kafka LLM worker only.
        takes = self.llm_step.take_budget(len(wanted))
        allowed = [i for i, take in zip(wanted, takes) if take.allowed]
        for i, take in zip(wanted, takes):
            if not take.allowed and decisions[i] is None:
                decisions[i] = self.llm_step.exhausted(items[i])
        audit_calls = 0
        if allowed:
            answers = call_with_retries(
                lambda: self.llm.answer([events[i] for i in allowed]),
                self.config.llm.max_retries, self.config.llm.retry_backoff_s, self.rng,
            )
            for i, answer in zip(allowed, answers):
                audit = routed.audits.get(i)
                if audit is None:
                    decisions[i], demos[i] = self.llm_step.settle(items[i], answer)
                    continue
                _, demos[i] = self.llm_step.settle(items[i], answer)  # a demonstration, not a second decision
                audit_calls += 1
                if answer.label is not None and self.contract is not None:
                    self.contract.record_audit(audit, answer.label)
        done: list[Decision] = decisions  # type: ignore[assignment]  # every event has its decision now
        cheap = self.config.state.cache_cheap_answers
        self.state.put_decisions((routed.keys[i], d) for i, d in enumerate(done) if cacheable(d, cheap))
        learned = [i for i, demo in enumerate(demos) if demo is not None]
        if learned:
            self.learner.learn([events[i] for i in learned], [demos[i].llm_label for i in learned],  # type: ignore[union-attr]
                               [routed.known[i] for i in learned])
        self._price_deferral()
        if self.contract is not None:
            for d in done:
                self.contract.record(d)
            params = self.contract.control(
                self.params, {s.tier.name: s.policy.defer_cost.cost for s in self.stages})
            if params is not None:
                self.set_params(params)
        return CascadeStep(done, routed.outputs, demos, audit_calls)

    def _route(self, events: Sequence[Event]) -> _Routed:
        n = len(events)
        now = time.time()
        items = [Deferred(event=e, first_seen=now) for e in events]
        outputs: list[list[TierOutput]] = [[] for _ in range(n)]
        known: list[dict[str, tuple[TierOutput, Any]]] = [{} for _ in range(n)]
        keys = cache_keys(self.task.name, self.task.labels, [e.text for e in events])
        decisions = self.state.get_decisions(keys, [e.id for e in events])  # answered before any tier runs
        pending = [i for i, hit in enumerate(decisions) if hit is None]
        audits: dict[int, Audit] = {}
        for stage in self.stages:
            if not pending:
                break
            step = route_stage(stage, [items[i] for i in pending], now)
            name, inputs = stage.tier.name, step.routing.inputs
            drawn: list[Audit | None] = [None] * len(step.answered)
            if self.contract is not None:
                self.contract.observe(step.routing)
                drawn = self.contract.draw_audits(
                    step.routing, [j for j, _ in step.answered], [events[i].id for i in pending])
            for (j, decision), audit in zip(step.answered, drawn, strict=True):
                i = pending[j]
                decisions[i] = decision
                output = step.routing.output(j)
                outputs[i].append(output)
                if audit is not None:  # its LLM answer is learned from, with what this tier computed
                    audits[i] = audit
                    known[i][name] = (output, inputs[j])
            still = []
            for j, item in step.passed:
                i = pending[j]
                items[i] = item
                outputs[i] = item.outputs
                known[i][name] = (item.outputs[-1], inputs[j])
                if not item.explored:  # explored events go straight to the LLM
                    still.append(i)
            pending = still
        return _Routed(decisions, items, outputs, known, keys, audits)

    def _price_deferral(self) -> None:
        costs = price_deferral([(s.tier.name, s.tier.cost) for s in self.stages],
                               {s.tier.name: s.routing() for s in self.stages}, self.config.llm.cost)
        for stage in self.stages:
            stage.policy.defer_cost = costs[stage.tier.name]
