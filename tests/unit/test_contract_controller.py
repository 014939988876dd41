"""The contract controller on a synthetic stream with a known agreement curve.

One cheap tier before the LLM. Each event's true disagreement probability is q ~ 1 - Beta(6, 1);
the policy predicts q / bias (bias 2: over-confident), risk = its predicted disagreement. After
``shift_at`` the tier gets twice as bad while the policy does not know.
"""

import json

import numpy as np

from cascade.contract import AgreementEstimator, ContractController

TARGET = 0.95
BATCH = 4000


def _oracle_llm_share(target: float, worse: float, bias: float, rng: np.random.Generator) -> float:
    """LLM share of the best fixed threshold: the loosest whose true agreement meets the target."""
    q = np.minimum(1.0, worse * (1.0 - rng.beta(6, 1, 400_000)))
    risk = q / worse / bias  # the policy never learns of the shift
    order = np.argsort(risk)
    ok = np.flatnonzero(np.cumsum(q[order]) / len(q) <= 1.0 - target)
    return 1.0 - (ok[-1] + 1) / len(q)


def _run(seed: int, events: int, bias: float = 1.0, shift_at: int | None = None, **contract: float):
    rng = np.random.default_rng(seed)
    est = AgreementEstimator(["t"], window_events=300_000, window_audits=8000)
    ctl = ContractController(["t"], seed=seed, **contract)
    tau = None
    agreement, llm_share, outputs = [], [], []
    for start in range(0, events, BATCH):
        worse = 2.0 if shift_at is not None and start >= shift_at else 1.0
        q_base = 1.0 - rng.beta(6, 1, BATCH)
        q = np.minimum(1.0, worse * q_base)
        p_policy = 1.0 - q_base / bias
        risk = 1.0 - p_policy
        ctl.observe_scores("t", risk, p_policy)
        answered = risk <= tau if tau is not None else np.zeros(BATCH, dtype=bool)
        agree = rng.random(BATCH) >= q
        audited = answered & (rng.random(BATCH) < 0.03)
        est.record_llm(int((~answered).sum()))
        est.record_cheap("t", int(answered.sum()))
        est.record_audits("t", int(agree[audited].sum()), int(audited.sum()))
        ctl.observe_audits("t", p_policy[audited], agree[audited])
        out = ctl.update(est.estimate())
        tau = out.thresholds.get("t")
        agreement.append(1.0 - float((q * answered).mean()))  # expected, to keep the test's noise down
        llm_share.append(1.0 - float(answered.mean()))
        outputs.append(out)
    return np.array(agreement), np.array(llm_share), outputs, est, ctl


def test_converges_to_target_near_the_oracle_share() -> None:
    for bias in (1.0, 2.0, 0.5):  # calibrated, over- and under-confident policy
        agreement, llm, outputs, est, _ = _run(0, 1_200_000, bias=bias, min_agreement=TARGET)
        tail = slice(len(agreement) // 2, None)
        oracle = _oracle_llm_share(TARGET, 1.0, bias, np.random.default_rng(1))
        assert agreement[tail].mean() >= TARGET
        assert llm[tail].mean() - oracle < 0.06  # the price of holding the lower bound, not the mean
        assert est.estimate().window_lower_bound >= TARGET - 0.005
        assert outputs[-1].contract_met is not None and not outputs[-1].budget_binding


def test_recovers_after_the_tier_gets_worse() -> None:
    shift = 600_000
    agreement, llm, _, est, _ = _run(1, 1_400_000, shift_at=shift, min_agreement=TARGET)
    after = shift // BATCH
    rolling = np.convolve(agreement, np.ones(10) / 10, mode="valid")  # 40k-event windows
    assert agreement[after] < TARGET  # the shift hurts at first
    recovered = after + 50  # 200k events later
    assert agreement[recovered:].mean() >= TARGET
    assert rolling[recovered:].min() >= TARGET - 0.02
    assert llm[recovered:].mean() > llm[after - 20 : after].mean()  # it deferred more to hold the target
    assert est.estimate().window_lower_bound >= TARGET - 0.005


def test_budget_wins_and_says_so() -> None:
    agreement, llm, outputs, _, _ = _run(2, 400_000, min_agreement=0.99, max_llm_fraction=0.3)
    tail = slice(len(llm) // 2, None)
    assert outputs[-1].budget_binding and "budget wins" in outputs[-1].reason
    calls = llm[tail] + 0.03 * (1 - llm[tail])
    assert abs(calls.mean() - 0.3) < 0.03
    assert agreement[tail].mean() < 0.99


def test_llm_fraction_alone_is_tracked() -> None:
    _, llm, outputs, _, _ = _run(3, 400_000, max_llm_fraction=0.5)
    tail = slice(len(llm) // 2, None)
    assert abs((llm[tail] + 0.03 * (1 - llm[tail])).mean() - 0.5) < 0.03
    assert outputs[-1].contract_met is None and not outputs[-1].budget_binding


def test_drift_raises_exploration_and_snapshot_restores() -> None:
    ctl = ContractController(["t"], min_agreement=TARGET, exploration_base=0.5)
    rng = np.random.default_rng(4)
    p = np.full(200, 0.95)
    for _ in range(10):
        ctl.observe_audits("t", p, rng.random(200) < 0.95)
    assert ctl.drifts == 0
    for _ in range(10):
        ctl.observe_audits("t", p, rng.random(200) < 0.6)
    assert ctl.drifts >= 1 and ctl.boost > 0
    ctl.observe_scores("t", 1 - p, p)
    est = AgreementEstimator(["t"])
    est.record_llm(10)
    out = ctl.update(est.estimate())
    assert out.exploration_scale > 0.5
    back = ContractController.from_snapshot(json.loads(json.dumps(ctl.snapshot())))
    assert back.snapshot() == ctl.snapshot()


def test_no_scores_no_thresholds() -> None:
    out = ContractController(["a", "b"], min_agreement=0.9).update(AgreementEstimator(["a", "b"]).estimate())
    assert out.thresholds == {} and out.reason == "no scores yet"
