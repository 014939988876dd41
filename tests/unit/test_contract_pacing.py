"""Budget pacing: spend spread over the window, little left over, never above the cap."""

import numpy as np

from cascade.contract.pacing import BudgetPacer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(budget: float, demand_factor: float, cost: float = 1.0, seed: int = 0) -> tuple[BudgetPacer, list[float]]:
    clock = Clock()
    pacer = BudgetPacer(budget, window_seconds=3600.0, clock=clock)
    rng = np.random.default_rng(seed)
    requests = int(demand_factor * budget / cost)
    times = np.sort(rng.uniform(0, 3600.0, requests))
    allowed_at = []
    for t in times:
        clock.now = float(t)
        if pacer.try_spend(cost):
            allowed_at.append(float(t))
        assert pacer.spent <= budget + 1e-9
    return pacer, allowed_at


def test_twice_the_demand_spends_nearly_all_and_spreads_it() -> None:
    for budget in (1000.0, 20_000.0):
        pacer, allowed = _run(budget, 2.0)
        assert budget * 0.95 <= pacer.spent <= budget
        per_quarter = np.histogram(allowed, bins=4, range=(0, 3600))[0]
        assert per_quarter.min() > 0.2 * len(allowed)  # not front-loaded


def test_money_costs_and_bursty_demand_stay_under_cap() -> None:
    clock = Clock()
    pacer = BudgetPacer(50.0, window_seconds=100.0, clock=clock)
    spent = 0.0
    for t in np.arange(0, 100, 0.01):
        clock.now = float(t)
        cost = 0.02 if int(t) % 10 < 5 else 0.3  # demand far above 50 per 100 s
        if pacer.try_spend(cost):
            spent += cost
    assert spent <= 50.0 + 1e-9 and spent >= 0.95 * 50.0


def test_low_demand_is_all_allowed_and_window_rolls() -> None:
    pacer, allowed = _run(1000.0, 0.5)
    assert len(allowed) >= 0.99 * 500
    clock = Clock()
    pacer = BudgetPacer(10.0, window_seconds=10.0, clock=clock)
    clock.now = 9.99
    assert sum(pacer.try_spend() for _ in range(20)) <= 10
    clock.now = 25.0  # two windows later: full budget again
    assert pacer.try_spend() and pacer.spent == 1.0 and pacer.window_start == 20.0


def test_snapshot_restores() -> None:
    clock = Clock()
    pacer = BudgetPacer(100.0, window_seconds=60.0, clock=clock)
    clock.now = 30.0
    pacer.try_spend()
    back = BudgetPacer.from_snapshot(pacer.snapshot(), clock=clock)
    assert back.snapshot() == pacer.snapshot()
