"""The quality contract in the in-process cascade: audits, their counting, the controller, the switch."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from cascade.config import CascadeConfig, load_config
from cascade.contract.audit import AuditSampler
from cascade.evaluation.data import LabelledEvent
from cascade.evaluation.simulate import simulate
from cascade.messages import Event
from cascade.routing.cascade import Cascade, CascadeStep
from tests.unit.streams import LLM, easy_and_hard


def make_config(deferral: dict[str, Any] | None = None, **contract: Any) -> CascadeConfig:
    return load_config(
        None, task={"labels": ["fear", "joy"]}, llm={"name": LLM}, features={"n_features": 2**16},
        deferral={"warmup": 50, **(deferral or {})}, contract=contract,
    )


def run(cascade: Cascade, n: int, seed: int) -> list[tuple[CascadeStep, Event]]:
    return [(cascade.step([e]), e) for e, _ in easy_and_hard(n, seed)]


def agreement(steps: list[tuple[CascadeStep, Event]]) -> float:
    """Of the delivered decisions, the share equal to the LLM's recorded answer."""
    return float(np.mean([s.decisions[0].label == e.payload["llm"][LLM] for s, e in steps]))


def test_the_contract_holds_agreement_and_still_answers_cheaply():
    cascade = Cascade(make_config(min_agreement=0.9, audit_rate=0.1))
    assert cascade.contract is not None
    steps = run(cascade, 3000, seed=1)
    late = steps[1000:]  # after warm-up and the first controller updates
    cheap = np.mean([s.decisions[0].tier == "logistic" for s, _ in late])
    # Half the stream is easy (the tier imitates the LLM there); the hard half is a coin flip.
    assert cheap > 0.3
    assert agreement(late) >= 0.9
    # Audited answers measure agreement wherever the tier answered; LLM answers agree by definition.
    audited = [s for s, _ in late if s.audit_calls]
    assert np.mean([s.demonstrations[0].llm_label == s.decisions[0].label for s in audited]) > 0.85  # type: ignore[union-attr]
    status = cascade.contract.status()
    assert status.estimated_agreement >= 0.9 and status.thresholds
    assert status.agreement_lower_bound <= status.estimated_agreement


def test_audits_are_a_hash_draw_among_cheap_answers_only():
    rate = 0.2
    cascade = Cascade(make_config(min_agreement=0.9, audit_rate=rate))
    steps = run(cascade, 2000, seed=3)
    sampler = AuditSampler(rate)
    cheap = [s for s, _ in steps if s.decisions[0].tier == "logistic" and s.decisions[0].reason == "tier"]
    audited = [s for s, _ in steps if s.audit_calls]
    assert all(s.decisions[0].tier == "logistic" for s in audited)  # the decision stays the tier's
    assert {s.decisions[0].event_id for s in audited} == {
        s.decisions[0].event_id for s in cheap if sampler.draw(s.decisions[0].event_id)
    }
    assert len(cheap) > 200 and abs(len(audited) / len(cheap) - rate) < 0.06
    assert all(s.demonstrations[0] is not None for s in audited)  # audits are learned from too


def test_audit_calls_count_as_llm_calls_in_the_report():
    rows = [LabelledEvent(e, None) for e, _ in easy_and_hard(1500, seed=4)]
    report = simulate(make_config(min_agreement=0.9, audit_rate=0.2), rows, progress=False)
    answered_by_llm = report.per_tier["llm"].answered
    assert report.audit_calls > 0 and report.llm_calls == answered_by_llm + report.audit_calls
    assert report.llm_call_fraction == report.llm_calls / report.events
    assert report.contract is not None and report.agreement_lower_bound == report.contract.agreement_lower_bound
    assert report.contract.audits_measured == report.audit_calls  # every recorded answer has a label


@pytest.mark.parametrize("fixed", [{"mu": 0.2}, {"threshold_overrides": {"logistic": 0.1}}])
def test_a_fixed_price_turns_the_contract_off(fixed):
    cascade = Cascade(make_config(fixed))
    assert cascade.contract is None
    steps = run(cascade, 800, seed=5)
    assert not any(s.audit_calls for s, _ in steps)
    assert all(s.decisions[0].tier == "llm" for s, _ in steps if s.demonstrations[0] is not None)
    assert cascade.params.exploration_scale == 1.0


def test_the_budget_wins_over_an_unreachable_agreement_target():
    rows = [LabelledEvent(e, None) for e, _ in easy_and_hard(2500, seed=6)]
    report = simulate(make_config(min_agreement=0.99, max_llm_fraction=0.3, audit_rate=0.05), rows, progress=False)
    assert report.contract is not None and report.contract.budget_binding_updates > 0
    assert "the budget wins" in (report.contract.budget_binding_reason or "")
    late_fraction = report.llm_call_fraction  # includes the warm-up, when everything goes to the LLM
    assert late_fraction < 0.5


def test_simulate_command_prints_the_bound_and_rejects_mu_with_a_target(tmp_path, capsys, monkeypatch):
    from workers.cli import main

    # Logging set up on pytest's captured stream would outlive it and fail later tests.
    monkeypatch.setattr("workers.cli.configure_logging", lambda *args: None)

    path = tmp_path / "stream.jsonl"
    rows = [{**e.payload, "label": e.payload["llm"][LLM]} for e, _ in easy_and_hard(1200, seed=7)]  # gold: the labels
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["simulate", "--data", str(path), "--llm", LLM, "--min-agreement", "0.9", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "agreement with the LLM ≥ 0." in out and "(95% confidence" in out and "LLM calls" in out
    assert main(["simulate", "--data", str(path), "--llm", LLM, "--mu", "0.2", "--min-agreement", "0.9"]) == 2
    assert "--mu" in capsys.readouterr().err
