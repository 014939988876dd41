"""The agreement confidence sequence: coverage on a synthetic stream with known agreement."""

import json

import numpy as np

from cascade.contract.estimator import AgreementEstimator, BettingLowerBound

SHARES = (0.3, 0.5, 0.2)  # LLM, tier a, tier b
AGREE = {"a": 0.9, "b": 0.75}
RATE = 0.03


def _stream_batch(est: AgreementEstimator, rng: np.random.Generator, n: int) -> None:
    counts = rng.multinomial(n, SHARES)
    est.record_llm(int(counts[0]))
    for tier, answered in zip(("a", "b"), counts[1:]):
        est.record_cheap(tier, int(answered))
        audited = int(rng.binomial(answered, RATE))
        est.record_audits(tier, int(rng.binomial(audited, AGREE[tier])), audited)


def test_lower_bound_covers_truth_at_every_checkpoint() -> None:
    # 200 seeds x 40 checkpoints every 500 events: the bound is read at every checkpoint.
    truth = SHARES[0] + SHARES[1] * AGREE["a"] + SHARES[2] * AGREE["b"]
    covered = total = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        est = AgreementEstimator(["a", "b"], alpha=0.05, window_events=4000, window_audits=200)
        for _ in range(40):
            _stream_batch(est, rng, 500)
            e = est.estimate()
            # Shares are counted exactly; the bound is on the agreement at the realised shares.
            realised = e.llm_share + sum(e.tiers[t].share * AGREE[t] for t in AGREE)
            window = e.window_llm_share + sum(e.tiers[t].window_share * AGREE[t] for t in AGREE)
            covered += (e.agreement_lower_bound <= realised) + (e.window_lower_bound <= window)
            total += 2
            assert e.agreement_lower_bound <= e.estimated_agreement + 1e-12
    assert covered / total >= 0.95
    assert abs(realised - truth) < 0.02


def test_bound_tightens_and_is_usable() -> None:
    rng = np.random.default_rng(1)
    cs = BettingLowerBound(0.05)
    x = rng.random(5000) < 0.9
    for xi in x:
        cs.update(int(xi))
    assert 0.87 < cs.lower <= 0.9
    assert cs.n == 5000 and cs.k == int(x.sum())


def test_batch_of_counts_is_order_free_and_matches_single_updates_for_one() -> None:
    one, batch = BettingLowerBound(0.05), BettingLowerBound(0.05)
    one.update(1, 1)
    batch.update(1)
    np.testing.assert_array_equal(one.log_wealth, batch.log_wealth)
    # A batch is one bet: its wealth depends on the counts only.
    a, b = BettingLowerBound(0.05), BettingLowerBound(0.05)
    a.update(30, 40)
    b.update(30, 40)
    np.testing.assert_allclose(a.log_wealth, b.log_wealth)


def test_windowed_bound_follows_a_drop() -> None:
    est = AgreementEstimator(["a"], window_events=20_000, window_audits=1000)
    rng = np.random.default_rng(3)
    for p in (0.95, 0.7):
        for _ in range(3000):
            est.record_cheap("a")
            est.record_audit("a", bool(rng.random() < p))
    e = est.estimate()
    assert e.tiers["a"].window_lower_bound <= 0.7 < e.tiers["a"].window_estimated_agreement + 0.05
    assert e.tiers["a"].window_audits <= 1000


def test_snapshot_is_json_and_restores() -> None:
    est = AgreementEstimator(["a", "b"], window_events=4000, window_audits=200)
    rng = np.random.default_rng(5)
    for _ in range(10):
        _stream_batch(est, rng, 500)
    state = json.loads(json.dumps(est.snapshot()))
    back = AgreementEstimator.from_snapshot(state)
    assert back.estimate() == est.estimate()
    _stream_batch(est, np.random.default_rng(9), 500)
    _stream_batch(back, np.random.default_rng(9), 500)
    assert back.estimate() == est.estimate()


def test_empty_and_llm_only_streams() -> None:
    est = AgreementEstimator(["a"])
    assert est.estimate().agreement_lower_bound == 1.0
    est.record_llm(10)
    est.record_cheap("a", 10)
    e = est.estimate()
    assert e.llm_share == 0.5 and e.agreement_lower_bound == 0.5 and e.audit_calls == 0
