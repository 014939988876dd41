import copy

import numpy as np
import pytest

from cascade.deferral.policy import DeferralPolicy
from cascade.routing.cascade import Cascade
from cascade.tiers.base import SnapshotError
from tests.unit.streams import easy_and_hard
from tests.unit.test_engine import make_config, run


@pytest.fixture(scope="module")
def trained():
    cascade = Cascade(make_config(warmup=20))
    run(cascade, easy_and_hard(300, seed=11))
    return cascade


def test_tier_round_trip(trained):
    stage = trained.stages[0]
    fresh = Cascade(make_config()).stages[0]
    fresh.tier.restore(stage.tier.snapshot())
    events = [e for e, _ in easy_and_hard(50, seed=12)]
    inputs = stage.tier.prepare(events)
    assert fresh.tier.version == stage.tier.version > 0
    assert np.allclose(fresh.tier.predict_proba(inputs), stage.tier.predict_proba(inputs))


def test_policy_round_trip(trained):
    policy = trained.stages[0].policy
    fresh = DeferralPolicy(policy.tier, policy.config)
    fresh.restore(policy.snapshot())
    features = np.random.default_rng(0).random((20, 6))
    assert fresh.version == policy.version
    assert np.allclose(fresh.p_agree(features), policy.p_agree(features))
    assert fresh.exploration() == policy.exploration()


def test_snapshot_mismatches_are_refused(trained):
    stage = trained.stages[0]
    with pytest.raises(SnapshotError):
        stage.tier.restore(stage.policy.snapshot())
    with pytest.raises(SnapshotError):
        stage.tier.restore(b"garbage")
    other = Cascade(make_config().model_copy(update={"task": make_config().task.model_copy(update={"labels": ["a", "b"]})}))
    with pytest.raises(SnapshotError, match="labels"):
        other.stages[0].tier.restore(stage.tier.snapshot())


def test_compiled_batch_scoring_equals_river(trained):
    from cascade.tiers.logistic import _COMPILE_FROM, CompiledWeights

    tier = copy.deepcopy(trained.stages[0].tier)  # its compiled copy changes below; the fixture is shared
    events = [e for e, _ in easy_and_hard(_COMPILE_FROM * 3, seed=13)]
    inputs = list(tier.prepare(events))  # the batch's rows, as river reads them
    learned = set().union(*(w.keys() for w in tier.model.weights.values()))
    unlearned = next(b for b in range(2**16) if b not in learned)
    inputs.append({unlearned: 1.0, -1: 1.0})  # no known feature but the bias: still a distribution
    tier._compiled = None
    river = np.vstack([tier.predict_proba([x]) for x in inputs])  # small batches: river, never compiled
    assert tier._compiled is None
    compiled = CompiledWeights(tier.model, tier.labels, tier.featurizer.config.n_features, tier.version)
    assert np.allclose(compiled.predict_proba(inputs), river, atol=1e-12)
    assert np.allclose(river.sum(axis=1), 1.0)


def test_large_batches_compile_once_river_would_have_paid_for_it(trained, monkeypatch):
    from cascade.tiers import logistic

    monkeypatch.setattr(logistic, "_WEIGHTS_PER_EVENT", 1)  # a dear copy: several batches pay for it
    tier = copy.deepcopy(trained.stages[0].tier)
    tier._compiled, tier._last_version = None, -1
    weights = sum(len(w) for w in tier.model.weights.values())
    batches_to_pay = -(-weights // logistic._COMPILE_FROM)  # ceil
    assert batches_to_pay > 1
    inputs = tier.prepare([e for e, _ in easy_and_hard(logistic._COMPILE_FROM, seed=14)])
    for _ in range(batches_to_pay - 1):
        tier.predict_proba(inputs)
    assert tier._compiled is None
    tier.predict_proba(inputs)
    assert tier._compiled is not None and tier._compiled.version == tier.version
    tier.learn([inputs[0]], ["joy"])  # the copy is stale now: river again until it pays anew
    tier.predict_proba(inputs)
    assert tier._compiled.version == tier.version - 1


def test_policy_batch_p_agree_equals_river(trained):
    policy = copy.deepcopy(trained.stages[0].policy)  # it learns below; the fixture is shared
    rng = np.random.default_rng(1)
    features = rng.normal(0, 3, (40, 12))
    features[0] = 1e3  # far past the logistic's saturation: river answers exactly 0 or 1 there
    features[1] = -1e3

    def river() -> np.ndarray:
        return np.array([policy.model.predict_proba_one(dict(enumerate(row)))[True] for row in features])

    assert np.allclose(policy.p_agree(features), river(), atol=1e-12)
    policy.learn(features[:5], [True, False, True, True, False])  # the numpy copy must follow learning
    assert np.allclose(policy.p_agree(features), river(), atol=1e-12)
    assert sorted(policy.p_agree(features[:2]).tolist()) == [0.0, 1.0]
