"""Scores of a run: accuracy against gold, agreement with the LLM, macro-F1, per tier and per class."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from pydantic import BaseModel

from cascade.contract.runtime import ContractStatus
from cascade.messages import Decision


class TierScore(BaseModel):
    answered: int
    fraction: float
    accuracy: float | None


class ClassScore(BaseModel):
    precision: float
    recall: float
    f1: float
    support: int


class Report(BaseModel):
    events: int
    llm_calls: int  # every LLM call: answers and audits
    llm_call_fraction: float
    accuracy: float
    llm_accuracy: float | None  # None when the LLM's answers were not recorded (a live LLM)
    # The first tier's own prediction on every event, same demonstrations (None where not seen).
    cheap_tier_alone_accuracy: float | None
    agreement_with_llm: float | None
    macro_f1: float
    per_tier: dict[str, TierScore]
    per_class: dict[str, ClassScore]
    llm_unusable: int
    cache_hits: int
    budget_exhausted: int
    explored: int
    missing_llm_answers: int
    total_cost: float
    events_per_second: float
    seconds: float
    config: dict[str, Any] = {}
    audit_calls: int = 0  # LLM calls that audited a cheap answer (in llm_calls)
    # The contract's own estimate of agreement with the LLM (from audits; None without a contract).
    estimated_agreement: float | None = None
    agreement_lower_bound: float | None = None  # holds with probability 1 - contract.alpha
    window_estimated_agreement: float | None = None
    window_agreement_lower_bound: float | None = None
    contract: ContractStatus | None = None
    # Share of the last 100 LLM answers that named no label (the LLM worker's gauge: `cascade run`).
    llm_unmapped_ratio: float | None = None


# The contract's estimates a report also shows at the top level.
_ESTIMATES = {"estimated_agreement", "agreement_lower_bound", "window_estimated_agreement",
              "window_agreement_lower_bound"}


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def per_class_scores(labels: list[str], gold: list[str | None], pred: list[str | None]) -> dict[str, ClassScore]:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    support: Counter[str] = Counter()
    for g, p in zip(gold, pred):
        if g is not None:
            support[g] += 1
        if p is not None and p == g:
            tp[p] += 1
        elif p is not None:
            fp[p] += 1
    out = {}
    for label in labels:
        precision = tp[label] / (tp[label] + fp[label]) if tp[label] + fp[label] else 0.0
        recall = tp[label] / support[label] if support[label] else 0.0
        out[label] = ClassScore(precision=precision, recall=recall, f1=_f1(precision, recall), support=support[label])
    return out


class Scorer:
    """Accumulates one run's outcomes; an answer of None (no usable answer) counts as wrong."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.gold: list[str | None] = []
        self.pred: list[str | None] = []
        self.llm_pred: list[str | None] = []
        self.cheap_pred: list[str | None] = []
        self.tiers: list[str] = []
        self.reasons: Counter[str] = Counter()
        self.explored = 0
        self.missing_llm = 0
        self.cost = 0.0
        self.audit_calls = 0

    @property
    def llm_calls(self) -> int:
        return self.reasons["llm"] + self.reasons["llm_unusable"] + self.audit_calls

    def add_decision(self, gold: str | None, d: Decision | None, llm_alone: str | None, cheap_alone: str | None) -> None:
        """One event's outcome; a missing decision counts as wrong, in a tier of its own."""
        self.gold.append(gold)
        self.pred.append(d.label if d else None)
        self.llm_pred.append(llm_alone)
        self.cheap_pred.append(cheap_alone)
        reason = d.reason if d else "missing"
        self.tiers.append("cache" if reason == "cache" else d.tier if d else "missing")
        self.reasons[reason] += 1
        self.explored += bool(d and d.explored)
        self.cost += d.cost if d else 0.0

    def report(
        self, seconds: float, config: dict[str, Any] | None = None, contract: ContractStatus | None = None
    ) -> Report:
        n = len(self.gold)
        acc = lambda a, b: sum(x is not None and x == y for x, y in zip(a, b)) / max(len(a), 1)  # noqa: E731
        per_class = per_class_scores(self.labels, self.gold, self.pred)
        recorded = any(p is not None for p in self.llm_pred)
        by_tier: dict[str, list[int]] = defaultdict(list)
        for i, t in enumerate(self.tiers):
            by_tier[t].append(i)
        per_tier = {
            t: TierScore(
                answered=len(ix), fraction=len(ix) / max(n, 1),
                accuracy=sum(self.pred[i] is not None and self.pred[i] == self.gold[i] for i in ix) / len(ix),
            )
            for t, ix in by_tier.items()
        }
        return Report(
            events=n,
            llm_calls=self.llm_calls,
            llm_call_fraction=self.llm_calls / max(n, 1),
            accuracy=acc(self.pred, self.gold),
            llm_accuracy=acc(self.llm_pred, self.gold) if recorded else None,
            cheap_tier_alone_accuracy=(
                acc(self.cheap_pred, self.gold) if any(p is not None for p in self.cheap_pred) else None
            ),
            agreement_with_llm=acc(self.pred, self.llm_pred) if recorded else None,
            macro_f1=sum(c.f1 for c in per_class.values()) / max(len(per_class), 1),
            per_tier=per_tier,
            per_class=per_class,
            llm_unusable=self.reasons["llm_unusable"],
            cache_hits=self.reasons["cache"],
            budget_exhausted=self.reasons["budget_exhausted"],
            explored=self.explored,
            missing_llm_answers=self.missing_llm,
            total_cost=self.cost,
            events_per_second=n / seconds if seconds > 0 else 0.0,
            seconds=seconds,
            config=config or {},
            audit_calls=self.audit_calls,
            contract=contract,
            **({} if contract is None else contract.model_dump(include=_ESTIMATES)),
        )
