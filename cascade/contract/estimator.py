"""Anytime-valid estimate of how often delivered decisions agree with the LLM.

Every delivered decision is answered either by the LLM (agrees by definition) or by a cheap tier
``t``. A fixed random fraction of the cheap answers is audited (also asked of the LLM, see
:mod:`cascade.contract.audit`), so tier ``t``'s audits are a uniform sample of its answers and
their mean estimates its agreement ``a_t``. With the shares counted exactly,

    agreement = share_llm + sum_t share_t * a_t,   lower bound = share_llm + sum_t share_t * LB_t.

``LB_t`` is a **confidence sequence**: ``P(exists n: LB_t(n) > a_t) <= alpha / len(tiers)``, so the
bound may be read after every event, by any number of dashboards or controllers, without losing
its level, and the overall bound holds for all tiers at once with probability ``>= 1 - alpha``
(Bonferroni). It is the one-sided betting confidence sequence of Waudby-Smith & Ramdas (2023,
"Estimating means of bounded random variables by betting", JRSS-B): for each candidate mean ``m``
on a grid a gambler bets ``lambda_i(m)`` on "the mean is above m" and holds wealth
``K_n(m) = prod_i (1 + lambda_i(m) (x_i - m))``; wealth is a test supermartingale when the mean is
at most ``m``, so by Ville's inequality ``m`` is rejected once ``K_n(m) >= 1/alpha``. The bet is the
predictable plug-in ``lambda_i = sqrt(2 log(1/alpha) / (sigma2_{i-1} i log(1+i)))``, truncated at
``0.5 / m`` (the windows' sequences tune the bet to their length instead). ``K_n(m)`` decreases in ``m`` (each factor does), so the rejected candidates are a
prefix of the grid and ``LB`` is the largest rejected grid point; its running maximum is kept (the
intersection of the sequence, still valid). The grid rounds the bound down, never up.

Cost: an update is a few numpy operations over the grid (500 points), O(1) per audit. Audits can
be fed in batches of counts (``record_audits(tier, agreed, n)``): one bet is held for the whole
batch, chosen before the batch is seen, which keeps it predictable; for Bernoulli outcomes the
batch's wealth then depends only on its counts, so the order within a batch does not matter.

Guarantee caveats. The level is exact when a tier's agreement is constant over the stream. When
it moves (drift, or the controller moving the threshold) wealth is still a supermartingale under
"every audit's conditional mean is at most m", so the bound never exceeds the largest conditional
agreement seen; for a drifting tier read the windowed bound.

Windowed bound. Per tier a fresh sequence restarts every ``window_audits // 2`` audits and the
older of the two live ones is reported, so the window covers the last ``window_audits / 2`` to
``window_audits`` audits of the tier. Each restart is its own confidence sequence at the same
level: *for any one window*, the chance that its bound ever exceeds the agreement (constant within
the window) is at most alpha/len(tiers). It is not simultaneous over all windows of an unbounded
stream (about alpha of the windows can err, like a fixed-time interval per window). The windowed
shares are counted exactly over the last ``window_events / 2`` to ``window_events`` events the
same way.

Several workers. Wealth on disjoint streams multiplies (each factor is predictable on the joint
past), so whole-stream log-wealth grids could be added; the windows would not line up, so no merge
is offered. Run one estimator where every audit and every LLM answer already arrives - the LLM
worker - and feed it the cheap answer counts (``record_cheap(tier, n)``) the tier workers publish.

API::

    est = AgreementEstimator(["logistic", "onnx"], alpha=0.05, window_events=200_000, window_audits=10_000)
    est.record_llm(n)                     # n decisions answered by the LLM
    est.record_cheap("logistic", n)       # n decisions answered by a cheap tier
    est.record_audit("logistic", True)    # one audited cheap answer; or record_audits(tier, agreed, n)
    e = est.estimate()                    # AgreementEstimate: .agreement_lower_bound, .window_lower_bound, ...
    state = est.snapshot()                # JSON-able dict; AgreementEstimator.from_snapshot(state)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

_TRUNCATION = 0.5  # bets at most 0.5/m: a wrong bet loses at most half the wealth (WSR 2023's c)


class BettingLowerBound:
    """One-sided betting confidence sequence for the mean of {0, 1} outcomes, on a grid of means."""

    def __init__(self, alpha: float, grid_size: int = 500, horizon: int | None = None) -> None:
        if not 0 < alpha < 1:
            raise ValueError("alpha must be in (0, 1)")
        self.alpha = alpha
        self.horizon = horizon  # tune the bet for this many outcomes (any predictable bet is valid)
        self.grid = (np.arange(grid_size) + 0.5) / grid_size
        self._cap = _TRUNCATION / self.grid
        self._log_threshold = math.log(1.0 / alpha)
        self.log_wealth = np.zeros(grid_size)
        self.n = 0  # outcomes seen
        self.k = 0  # of them 1 (agreed)
        self.sq = 0.0  # sum of (x_i - mean_hat_{i-1})^2, for the plug-in variance
        self.lower = 0.0  # running maximum of the bound

    @property
    def mean_hat(self) -> float:
        """Smoothed mean (0.5 with no data), the plug-in centre of the variance."""
        return (0.5 + self.k) / (1.0 + self.n)

    def _bet(self) -> float:
        t = self.n + 1  # index of the next outcome
        var = (0.25 + self.sq) / t
        # Without a horizon: WSR's predictable plug-in, good at every n. With one: the bet that is
        # tightest near n = horizon (about 20% narrower there), for windows of known length.
        scale = self.horizon if self.horizon is not None else t * math.log1p(t)
        return math.sqrt(2.0 * self._log_threshold / (var * scale))

    def update(self, agreed: int, n: int = 1) -> None:
        """Add ``n`` outcomes of which ``agreed`` are 1, all under the bet chosen before them."""
        if n <= 0:
            return
        if not 0 <= agreed <= n:
            raise ValueError("agreed must be in [0, n]")
        lam = np.minimum(self._bet(), self._cap)
        if agreed:
            self.log_wealth += agreed * np.log1p(lam * (1.0 - self.grid))
        if n - agreed:
            self.log_wealth += (n - agreed) * np.log1p(-lam * self.grid)
        m = self.mean_hat
        self.sq += agreed * (1.0 - m) ** 2 + (n - agreed) * m * m
        self.n += n
        self.k += agreed
        rejected = int(np.count_nonzero(self.log_wealth >= self._log_threshold))  # a prefix of the grid
        if rejected:
            self.lower = max(self.lower, float(self.grid[rejected - 1]))

    def state(self) -> dict[str, Any]:
        return {"n": self.n, "k": self.k, "sq": self.sq, "lower": self.lower, "log_wealth": self.log_wealth.tolist()}

    @classmethod
    def from_state(cls, alpha: float, state: dict[str, Any], horizon: int | None = None) -> BettingLowerBound:
        cs = cls(alpha, grid_size=len(state["log_wealth"]), horizon=horizon)
        cs.log_wealth = np.asarray(state["log_wealth"], dtype=float)
        cs.n, cs.k, cs.sq, cs.lower = int(state["n"]), int(state["k"]), float(state["sq"]), float(state["lower"])
        return cs


class _RestartingBound:
    """Two staggered sequences; the older one, covering the last W/2 to W outcomes, is reported."""

    def __init__(self, alpha: float, window: int, grid_size: int) -> None:
        self.alpha, self.half, self.grid_size = alpha, max(1, window // 2), grid_size
        self.horizon = max(1, 3 * window // 4)  # the reported one holds W/2 to W outcomes
        self.older = self._fresh()
        self.younger = self._fresh()

    def _fresh(self) -> BettingLowerBound:
        return BettingLowerBound(self.alpha, self.grid_size, self.horizon)

    def update(self, agreed: int, n: int) -> None:
        self.older.update(agreed, n)
        self.younger.update(agreed, n)
        if self.younger.n >= self.half:
            self.older, self.younger = self.younger, self._fresh()

    def state(self) -> dict[str, Any]:
        return {"older": self.older.state(), "younger": self.younger.state()}

    def load(self, state: dict[str, Any]) -> None:
        self.older = BettingLowerBound.from_state(self.alpha, state["older"], self.horizon)
        self.younger = BettingLowerBound.from_state(self.alpha, state["younger"], self.horizon)


@dataclass(frozen=True)
class TierEstimate:
    answers: int  # delivered decisions this tier answered (whole stream)
    share: float  # of all delivered decisions
    audits: int
    audit_agreements: int
    estimated_agreement: float  # smoothed audit mean; 0.5 before any audit
    lower_bound: float  # confidence sequence at level alpha / len(tiers)
    window_share: float
    window_audits: int
    window_estimated_agreement: float
    window_lower_bound: float


@dataclass(frozen=True)
class AgreementEstimate:
    events: int  # delivered decisions
    llm_answers: int
    audit_calls: int  # extra LLM calls spent on audits
    llm_share: float
    estimated_agreement: float
    agreement_lower_bound: float  # holds with probability >= 1 - alpha at every time at once
    window_events: int
    window_llm_share: float
    window_estimated_agreement: float
    window_lower_bound: float
    tiers: dict[str, TierEstimate]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class AgreementEstimator:
    """Whole-stream and windowed agreement of delivered decisions with the LLM (see module docstring)."""

    def __init__(
        self,
        tiers: list[str],
        alpha: float = 0.05,
        window_events: int = 200_000,
        window_audits: int = 10_000,
        grid_size: int = 500,
    ) -> None:
        if not tiers or len(set(tiers)) != len(tiers):
            raise ValueError("tiers must be non-empty and distinct")
        self.tiers = list(tiers)
        self.alpha = alpha
        self.tier_alpha = alpha / len(tiers)  # Bonferroni: the overall bound needs every tier's at once
        self.window_events, self.window_audits, self.grid_size = window_events, window_audits, grid_size
        self.llm = 0
        self.cheap = dict.fromkeys(self.tiers, 0)
        self.whole = {t: BettingLowerBound(self.tier_alpha, grid_size) for t in self.tiers}
        self.windowed = {t: _RestartingBound(self.tier_alpha, window_audits, grid_size) for t in self.tiers}
        # Event-count windows for the shares: [llm, cheap per tier] in the older and the younger block.
        self._half_events = max(1, window_events // 2)
        self._older = np.zeros(1 + len(tiers), dtype=np.int64)
        self._younger = np.zeros(1 + len(tiers), dtype=np.int64)
        self._index = {t: i + 1 for i, t in enumerate(self.tiers)}

    # -- recording ------------------------------------------------------------------------
    def _count(self, slot: int, n: int) -> None:
        self._older[slot] += n
        self._younger[slot] += n
        if self._younger.sum() >= self._half_events:
            self._older, self._younger = self._younger, np.zeros_like(self._younger)

    def record_llm(self, n: int = 1) -> None:
        """``n`` delivered decisions answered by the LLM (explored and deferred events alike)."""
        self.llm += n
        self._count(0, n)

    def record_cheap(self, tier: str, n: int = 1) -> None:
        """``n`` delivered decisions answered by cheap ``tier`` (audited ones included)."""
        self.cheap[tier] += n
        self._count(self._index[tier], n)

    def record_audit(self, tier: str, agree: bool) -> None:
        self.record_audits(tier, int(agree), 1)

    def record_audits(self, tier: str, agreed: int, n: int) -> None:
        """``n`` audited answers of ``tier``, ``agreed`` of which the LLM agreed with."""
        self.whole[tier].update(agreed, n)
        self.windowed[tier].update(agreed, n)

    # -- reading --------------------------------------------------------------------------
    def estimate(self) -> AgreementEstimate:
        events = self.llm + sum(self.cheap.values())
        w_events = int(self._older.sum())
        # An empty stream agrees vacuously: nothing delivered, nothing to hold.
        share = {t: self.cheap[t] / events if events else 0.0 for t in self.tiers}
        w_share = {t: int(self._older[self._index[t]]) / w_events if w_events else 0.0 for t in self.tiers}
        tiers = {}
        for t in self.tiers:
            whole, win = self.whole[t], self.windowed[t].older
            tiers[t] = TierEstimate(
                answers=self.cheap[t],
                share=share[t],
                audits=whole.n,
                audit_agreements=whole.k,
                estimated_agreement=whole.mean_hat,
                lower_bound=whole.lower,
                window_share=w_share[t],
                window_audits=win.n,
                window_estimated_agreement=win.mean_hat,
                window_lower_bound=win.lower,
            )
        llm_share = self.llm / events if events else 1.0
        w_llm_share = int(self._older[0]) / w_events if w_events else 1.0
        return AgreementEstimate(
            events=events,
            llm_answers=self.llm,
            audit_calls=sum(cs.n for cs in self.whole.values()),
            llm_share=llm_share,
            estimated_agreement=llm_share + sum(share[t] * tiers[t].estimated_agreement for t in self.tiers),
            agreement_lower_bound=llm_share + sum(share[t] * tiers[t].lower_bound for t in self.tiers),
            window_events=w_events,
            window_llm_share=w_llm_share,
            window_estimated_agreement=w_llm_share
            + sum(w_share[t] * tiers[t].window_estimated_agreement for t in self.tiers),
            window_lower_bound=w_llm_share + sum(w_share[t] * tiers[t].window_lower_bound for t in self.tiers),
            tiers=tiers,
        )

    # -- snapshots ------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Plain JSON-able state (about 30 KB of JSON per tier with the default grid)."""
        return {
            "tiers": self.tiers,
            "alpha": self.alpha,
            "window_events": self.window_events,
            "window_audits": self.window_audits,
            "grid_size": self.grid_size,
            "llm": self.llm,
            "cheap": dict(self.cheap),
            "whole": {t: cs.state() for t, cs in self.whole.items()},
            "windowed": {t: w.state() for t, w in self.windowed.items()},
            "event_blocks": [self._older.tolist(), self._younger.tolist()],
        }

    @classmethod
    def from_snapshot(cls, state: dict[str, Any]) -> AgreementEstimator:
        est = cls(
            state["tiers"],
            alpha=state["alpha"],
            window_events=state["window_events"],
            window_audits=state["window_audits"],
            grid_size=state["grid_size"],
        )
        est.llm = int(state["llm"])
        est.cheap = {t: int(state["cheap"][t]) for t in est.tiers}
        est.whole = {t: BettingLowerBound.from_state(est.tier_alpha, state["whole"][t]) for t in est.tiers}
        for t in est.tiers:
            est.windowed[t].load(state["windowed"][t])
        older, younger = state["event_blocks"]
        est._older = np.asarray(older, dtype=np.int64)
        est._younger = np.asarray(younger, dtype=np.int64)
        return est
