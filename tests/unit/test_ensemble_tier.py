"""The ensemble tier: the mean of its members, their disagreement as policy features."""

import numpy as np
import pytest

from cascade.config import FeatureConfig, load_config
from cascade.routing.stage import Stage
from cascade.tiers.base import SnapshotError
from cascade.tiers.ensemble import EnsembleTier
from cascade.tiers.registry import build_tier
from tests.unit.streams import LLM, easy_and_hard

MEMBERS = [{"name": "lr", "kind": "logistic"}, {"name": "nb", "kind": "nblr"}]


def _config(members=MEMBERS):  # type: ignore[no-untyped-def]
    return load_config(None, tiers=[{"name": "ens", "kind": "ensemble", "members": members}])


def _ensemble(labels):  # type: ignore[no-untyped-def]
    tier = build_tier(_config().tiers[0], labels, FeatureConfig())
    assert isinstance(tier, EnsembleTier)
    return tier


def _stream():  # type: ignore[no-untyped-def]
    stream = easy_and_hard(96, seed=3)
    events = [e for e, _ in stream]
    answers = [e.payload["llm"][LLM] for e, _ in stream]
    return events, answers, list(dict.fromkeys(answers))


def test_config_validates_members_by_kind() -> None:
    tier = _config().tiers[0]
    assert [type(m).__name__ for m in tier.members] == ["LogisticTierConfig", "NblrTierConfig"]  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="alpha"):
        _config([{"name": "lr", "kind": "logistic", "alpha": 1.0}, {"name": "nb", "kind": "nblr"}])
    with pytest.raises(Exception, match="repeated"):
        _config([{"name": "x", "kind": "logistic"}, {"name": "x", "kind": "nblr"}])


def test_mean_of_members_and_disagreement_features() -> None:
    events, answers, labels = _stream()
    tier = _ensemble(labels)
    tier.learn(tier.prepare(events[:48]), answers[:48])
    inputs = tier.prepare(events)
    probs = tier.predict_proba(inputs)
    members = [m.predict_proba(m.prepare(events)) for m in tier.members]
    np.testing.assert_allclose(probs, (members[0] + members[1]) / 2, atol=1e-9)
    extra = tier.extra_features(inputs, probs)
    assert extra is not None and extra.shape == (len(events), 2)
    np.testing.assert_allclose(extra[:, 0], 0.5 * np.abs(members[0] - members[1]).sum(axis=1), atol=1e-9)
    np.testing.assert_array_equal(extra[:, 1], members[0].argmax(1) != members[1].argmax(1))


def test_stage_policy_features_hold_the_extra_ones_and_others_are_unchanged() -> None:
    events, answers, labels = _stream()
    config = _config()
    from cascade.deferral.policy import DeferralPolicy
    from cascade.messages import LiveParams

    ens = _ensemble(labels)
    lone = build_tier(load_config(None).tiers[0], labels, FeatureConfig())
    for tier, width in ((ens, 5 + len(labels) + 2), (lone, 5 + len(labels))):
        stage = Stage(tier, DeferralPolicy(tier.name, config.deferral), LiveParams(mu=0.3), seed=0)
        routing = stage.route(events)
        assert routing.policy_features.shape == (len(events), width)


def test_a_bad_member_snapshot_changes_nothing() -> None:
    events, answers, labels = _stream()
    tier = _ensemble(labels)
    tier.learn(tier.prepare(events), answers)
    other = _ensemble(labels)
    good = other.snapshot()
    # A snapshot whose second member is over other labels: the first restores, then the second fails.
    swapped = _ensemble(list(reversed(labels)))
    from cascade.snapshots import decode_snapshot, encode_snapshot

    version, state = decode_snapshot(good, "ensemble")
    state["model"]["members"][1]["snapshot"] = swapped.members[1].snapshot()
    before = tier.predict_proba(tier.prepare(events))
    with pytest.raises(SnapshotError):
        tier.restore(encode_snapshot("ensemble", version, state))
    np.testing.assert_array_equal(tier.predict_proba(tier.prepare(events)), before)
