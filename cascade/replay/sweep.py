"""Sweep specifications: which deferral settings a replay tries.

``--sweep NAME=SPEC`` with SPEC one of

* ``lo:hi:linN``  N evenly spaced values from lo to hi (both included),
* ``lo:hi:logN``  N log-spaced values from lo to hi (both included; lo > 0),
* ``a,b,c``       exactly these values (one value is a list of one).

NAME is ``mu`` or ``threshold.TIER`` (a per-tier override of the mu rule: the largest expected
disagreement at which TIER still answers). Several ``--sweep`` options form their grid
(cartesian product). Every setting is replayed with exploration off (``exploration_scale=0``),
so a replay is deterministic and the LLM-call fraction falls as mu or a threshold rises.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cascade.messages import LiveParams

_RANGE = re.compile(r"^\s*([^:]+):([^:]+):(lin|log)(\d+)\s*$")
THRESHOLD = "threshold."


class SweepError(ValueError):
    """A sweep specification that cannot be parsed; the message says why."""


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SweepError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SweepError(f"{what}: {text!r} is not finite")
    return value


def parse_values(spec: str, what: str = "sweep") -> list[float]:
    """The values of one SPEC (``lo:hi:linN``, ``lo:hi:logN`` or ``a,b,c``), in the order given."""
    m = _RANGE.match(spec)
    if m:
        lo, hi = _number(m.group(1), what), _number(m.group(2), what)
        n = int(m.group(4))
        if n < 1:
            raise SweepError(f"{what}: a range needs at least one point")
        if n == 1:
            return [lo]
        if m.group(3) == "lin":
            return [lo + (hi - lo) * i / (n - 1) for i in range(n)]
        if lo <= 0 or hi <= 0:
            raise SweepError(f"{what}: a log range needs positive ends, got {lo}:{hi}")
        a, b = math.log(lo), math.log(hi)
        return [math.exp(a + (b - a) * i / (n - 1)) for i in range(n)]
    if ":" in spec:
        raise SweepError(f"{what}: expected lo:hi:linN, lo:hi:logN or a comma list, got {spec!r}")
    values = [_number(v.strip(), what) for v in spec.split(",") if v.strip()]
    if not values:
        raise SweepError(f"{what}: no values in {spec!r}")
    return values


@dataclass(frozen=True)
class Dimension:
    name: str  # "mu" or "threshold.TIER"
    values: tuple[float, ...]


def parse_dimension(text: str, tiers: Sequence[str]) -> Dimension:
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep:
        raise SweepError(f"expected NAME=SPEC, got {text!r}")
    if name == "mu":
        pass
    elif name.startswith(THRESHOLD):
        tier = name[len(THRESHOLD):]
        if tier not in tiers:
            raise SweepError(f"{name}: unknown tier {tier!r}; configured tiers: {list(tiers)}")
    else:
        raise SweepError(f"unknown sweep parameter {name!r}: use mu or threshold.TIER")
    values = parse_values(spec, name)
    if any(v < 0 for v in values):
        raise SweepError(f"{name}: values must not be negative")
    return Dimension(name, tuple(values))


@dataclass(frozen=True)
class Setting:
    """One point of a sweep: the swept parameters' values, in sweep order."""

    values: tuple[tuple[str, float], ...]

    def label(self) -> str:
        return " ".join(f"{k}={v:.4g}" for k, v in self.values)

    def as_dict(self) -> dict[str, float]:
        return dict(self.values)

    def params(self, base: LiveParams, exploration_scale: float = 0.0) -> LiveParams:
        """The live parameters of this setting on top of ``base`` (exploration off by default)."""
        mu = base.mu
        thresholds = dict(base.thresholds)
        for name, value in self.values:
            if name == "mu":
                mu = value
            else:
                thresholds[name[len(THRESHOLD):]] = value
        return LiveParams(mu=mu, thresholds=thresholds, exploration_scale=exploration_scale)


def parse_sweep(specs: Iterable[str], tiers: Sequence[str]) -> list[Setting]:
    """The grid of all ``--sweep`` options (cartesian product, first option varying slowest)."""
    dims = [parse_dimension(s, tiers) for s in specs]
    names = [d.name for d in dims]
    if len(set(names)) != len(names):
        raise SweepError(f"a parameter is swept twice: {names}")
    if not dims:
        raise SweepError("no sweep given")
    return [Setting(tuple(zip(names, combo))) for combo in itertools.product(*(d.values for d in dims))]


DEFAULT_SWEEP = "mu=0.02:1:log10"
