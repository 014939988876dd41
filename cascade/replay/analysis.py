"""Reading a sweep: the quality measure, the Pareto front, targets and the recommended setting."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel

from cascade.replay.engine import PointResult

# name -> (what it bounds, direction)
TARGETS = {
    "budget_per_hour": "total cost per hour at the recorded event rate, at most X (config cost units; an LLM call costs llm.cost)",
    "llm_calls_per_hour": "LLM calls per hour at the recorded event rate, at most X",
    "max_llm_fraction": "fraction of events sent to the LLM, at most X",
    "max_disagreement": "disagreement with the LLM's recorded answers, at most X",
    "min_accuracy": "accuracy against gold labels, at least X",
}
MEASURES = {
    "budget_per_hour": "cost/hour", "llm_calls_per_hour": "LLM calls/hour", "max_llm_fraction": "LLM-call fraction",
    "max_disagreement": "disagreement", "min_accuracy": "accuracy",
}
BUDGETS = ("budget_per_hour", "llm_calls_per_hour", "max_llm_fraction")


class TargetError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    name: str
    value: float

    def __str__(self) -> str:
        return f"{self.name}={self.value:g}"


def parse_target(text: str) -> Target:
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or name not in TARGETS:
        raise TargetError(f"expected one of {', '.join(f'{t}=X' for t in TARGETS)}; got {text!r}")
    try:
        v = float(value)
    except ValueError:
        raise TargetError(f"{name}: {value!r} is not a number") from None
    if v < 0:
        raise TargetError(f"{name}: must not be negative")
    return Target(name, v)


def quality_metric(points: Sequence[PointResult]) -> str:
    """Accuracy when the stream has gold labels, else agreement with the LLM."""
    return "accuracy" if any(p.accuracy is not None for p in points) else "agreement_with_llm"


def quality(p: PointResult, metric: str) -> float:
    value = p.accuracy if metric == "accuracy" else p.agreement_with_llm
    return -1.0 if value is None else value


def mark_pareto(points: Sequence[PointResult], metric: str) -> None:
    """``pareto`` = no other setting is at most as costly and at least as good, and better in one."""
    for p in points:
        c, q = p.cost_per_event, quality(p, metric)
        p.pareto = not any(
            o is not p and o.cost_per_event <= c and quality(o, metric) >= q
            and (o.cost_per_event < c or quality(o, metric) > q)
            for o in points
        )


class Recommendation(BaseModel):
    target: str
    index: int | None  # into the sweep's points; None when no setting meets the target
    label: str | None
    reason: str


def check_target(target: Target, has_gold: bool, has_rate: bool) -> None:
    """Raise TargetError when the replayed stream cannot tell whether a setting meets ``target``."""
    if target.name == "min_accuracy" and not has_gold:
        raise TargetError(f"target {target} needs gold labels in the replayed events (--gold-field)")
    if target.name in ("budget_per_hour", "llm_calls_per_hour") and not has_rate:
        raise TargetError(f"target {target} needs an event rate: record timestamps spanning time, or --events-per-hour")


def _measure(p: PointResult, name: str) -> float | None:
    return {
        "budget_per_hour": p.cost_per_hour,
        "llm_calls_per_hour": p.llm_calls_per_hour,
        "max_llm_fraction": p.llm_call_fraction,
        "max_disagreement": p.disagreement,
        "min_accuracy": p.accuracy,
    }[name]


def recommend(points: Sequence[PointResult], target: Target, metric: str) -> Recommendation:
    """A budget: the best setting within it. A quality floor: the cheapest setting meeting it.

    Ties go to the cheaper setting (budgets) or the better one (floors), then to the earlier.
    """
    values = [_measure(p, target.name) for p in points]
    if all(v is None for v in values):
        need = {
            "budget_per_hour": "an event rate (record timestamps, or --events-per-hour)",
            "llm_calls_per_hour": "an event rate (record timestamps, or --events-per-hour)",
            "min_accuracy": "gold labels in the replayed events",
            "max_disagreement": "recorded LLM answers that name a label",
        }.get(target.name, "data")
        raise TargetError(f"target {target} needs {need}")
    lower_is_ok = target.name != "min_accuracy"
    ok = [i for i, v in enumerate(values) if v is not None and (v <= target.value if lower_is_ok else v >= target.value)]
    if not ok:
        best = min(range(len(points)), key=lambda i: (values[i] is None, values[i] if lower_is_ok else -(values[i] or 0)))
        return Recommendation(
            target=str(target), index=None, label=None,
            reason=f"no setting meets {target}; closest is {points[best].label} with {MEASURES[target.name]} "
                   f"{values[best]:.4g}",
        )
    if target.name in BUDGETS:
        i = min(ok, key=lambda i: (-quality(points[i], metric), points[i].cost_per_event, i))
        why = f"the best {metric} ({quality(points[i], metric):.4f}) within {target}"
    else:
        i = min(ok, key=lambda i: (points[i].cost_per_event, -quality(points[i], metric), i))
        why = f"the cheapest setting meeting {target} (cost/event {points[i].cost_per_event:.4g})"
    return Recommendation(target=str(target), index=i, label=points[i].label, reason=why)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def format_table(points: Sequence[PointResult], recommended: int | None = None) -> str:
    head = ["setting", "LLM calls", "agreement", "accuracy", "cost/event", "cost/hour", "LLM calls/h", "pareto"]
    rows = [head]
    for i, p in enumerate(points):
        rows.append([
            p.label + (" <" if i == recommended else ""), _pct(p.llm_call_fraction), _num(p.agreement_with_llm),
            _num(p.accuracy), _num(p.cost_per_event, ".2f"), _num(p.cost_per_hour, ",.0f"),
            _num(p.llm_calls_per_hour, ",.0f"), "*" if p.pareto else "",
        ])
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)
