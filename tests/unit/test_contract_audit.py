"""The audit draw: deterministic per event and independent of the policy's confidence."""

import numpy as np

from cascade.contract.audit import AuditSampler


def test_draw_is_deterministic_and_salted() -> None:
    a, b = AuditSampler(0.03, salt="s1"), AuditSampler(0.03, salt="s1")
    ids = [f"evt-{i}" for i in range(20_000)]
    np.testing.assert_array_equal(a.draw_batch(ids), b.draw_batch(ids))  # replicas and redeliveries agree
    assert [a.draw(i) for i in ids[:100]] == a.draw_batch(ids[:100]).tolist()
    other = AuditSampler(0.03, salt="s2").draw_batch(ids)
    assert (other != a.draw_batch(ids)).any()
    assert AuditSampler(1.0).draw("x") and not AuditSampler(0.0).draw("x")


def test_audited_share_does_not_depend_on_policy_confidence() -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    # Sequential ids and a confidence that trends with them: the worst case for a naive draw.
    ids = [f"evt-{i}" for i in range(n)]
    confidence = np.clip(np.linspace(0, 1, n) + rng.normal(0, 0.1, n), 0, 1)
    audited = AuditSampler(0.03).draw_batch(ids)
    high, low = audited[confidence > 0.5], audited[confidence <= 0.5]
    se = np.sqrt(0.03 * 0.97 * (1 / len(high) + 1 / len(low)))
    assert abs(high.mean() - low.mean()) < 4 * se
    assert abs(audited.mean() - 0.03) < 4 * np.sqrt(0.03 * 0.97 / n)
    # Within deciles of confidence too (a chi-square-like check, loose bound).
    deciles = np.digitize(confidence, np.quantile(confidence, np.linspace(0.1, 0.9, 9)))
    rates = np.array([audited[deciles == d].mean() for d in range(10)])
    assert np.all(np.abs(rates - 0.03) < 4 * np.sqrt(0.03 * 0.97 / (n / 10)))
