"""The numpy logistic tier is river's SoftmaxRegression (bench/river_logistic.py), learned in numpy."""

import numpy as np
import pytest

from bench.river_logistic import RiverLogisticTier
from cascade.config import FeatureConfig, LogisticTierConfig
from cascade.tiers.base import SnapshotError
from cascade.tiers.logistic import LogisticTier
from tests.unit.streams import LLM, easy_and_hard

LABELS = ["fear", "joy", "anger"]  # "anger" never answered: river gives it probability 0 throughout
FEATURES = FeatureConfig(n_features=2**14)
CONFIGS = [
    LogisticTierConfig(name="logistic"),
    LogisticTierConfig(name="logistic", l2=1e-3, learning_rate=0.5),
    LogisticTierConfig(name="logistic", optimizer="sgd", learning_rate=0.3, l2=1e-4),
]


def stream(n: int, seed: int) -> tuple[list, list[str]]:
    pairs = easy_and_hard(n, seed=seed)
    return [e for e, _ in pairs], [e.payload["llm"][LLM] for e, _ in pairs]


def prequential(tier, events, answers) -> np.ndarray:
    """Each event scored alone, then learned: the in-process cascade's order."""
    out = []
    for event, answer in zip(events, answers):
        inputs = tier.prepare([event])
        out.append(tier.predict_proba(inputs)[0])
        tier.learn(inputs, [answer])
    return np.array(out)


@pytest.mark.parametrize("config", CONFIGS, ids=["adagrad", "adagrad-l2", "sgd-l2"])
def test_numpy_logistic_equals_river_on_a_stream(config):
    events, answers = stream(400, seed=5)
    river, numpy_tier = RiverLogisticTier(config, LABELS, FEATURES), LogisticTier(config, LABELS, FEATURES)
    p_river, p_numpy = prequential(river, events, answers), prequential(numpy_tier, events, answers)
    assert np.abs(p_river - p_numpy).max() < 1e-9
    assert np.array_equal(p_river.argmax(axis=1), p_numpy.argmax(axis=1))
    assert np.allclose(p_numpy[0], 1 / len(LABELS))  # untrained: uniform, as river's tier was
    assert (p_numpy[1:, LABELS.index("anger")] == 0).all()  # never learned: outside the softmax
    # Batches (numpy featurisation, reduceat scoring) too.
    test, _ = stream(80, seed=6)
    assert np.abs(river.predict_proba(river.prepare(test)) - numpy_tier.predict_proba(numpy_tier.prepare(test))).max() < 1e-9


@pytest.mark.parametrize("config", CONFIGS, ids=["adagrad", "adagrad-l2", "sgd-l2"])
def test_a_river_snapshot_is_converted_and_goes_on_learning_as_river(config):
    events, answers = stream(300, seed=7)
    river = RiverLogisticTier(config, LABELS, FEATURES)
    river.learn(river.prepare(events[:150]), answers[:150])
    converted = LogisticTier(config, LABELS, FEATURES)
    converted.restore(river.snapshot())
    assert converted.version == river.version == 150
    test, _ = stream(60, seed=8)
    assert np.abs(river.predict_proba(river.prepare(test)) - converted.predict_proba(converted.prepare(test))).max() < 1e-12
    for tier in (river, converted):
        tier.learn(tier.prepare(events[150:]), answers[150:])
    assert np.abs(river.predict_proba(river.prepare(test)) - converted.predict_proba(converted.prepare(test))).max() < 1e-9
    # Published again, it is in the tier's own format, which restores exactly.
    again = LogisticTier(config, LABELS, FEATURES)
    again.restore(converted.snapshot())
    assert np.array_equal(again.predict_proba(again.prepare(test)), converted.predict_proba(converted.prepare(test)))


def test_a_river_snapshot_of_another_optimizer_is_refused_by_name():
    events, answers = stream(100, seed=9)
    river = RiverLogisticTier(LogisticTierConfig(name="logistic", learning_rate=0.5), LABELS, FEATURES)
    river.learn(river.prepare(events), answers)
    tier = LogisticTier(LogisticTierConfig(name="logistic"), LABELS, FEATURES)
    before = tier.snapshot()
    with pytest.raises(SnapshotError, match="AdaGrad at lr 0.5; this tier is adagrad at lr 1.0"):
        tier.restore(river.snapshot())
    sgd = LogisticTier(LogisticTierConfig(name="logistic", optimizer="sgd", learning_rate=0.5), LABELS, FEATURES)
    with pytest.raises(SnapshotError, match="AdaGrad"):
        sgd.restore(river.snapshot())
    l2 = LogisticTier(LogisticTierConfig(name="logistic", learning_rate=0.5, l2=0.1), LABELS, FEATURES)
    with pytest.raises(SnapshotError, match="l2"):
        l2.restore(river.snapshot())
    assert tier.snapshot() == before and tier.version == 0


def test_a_snapshot_holds_only_the_buckets_learned():
    events, answers = stream(100, seed=10)
    tier = LogisticTier(CONFIGS[0], LABELS, FEATURES)
    inputs = tier.prepare(events)
    tier.learn(inputs, answers)
    held = np.unique(np.concatenate([np.fromiter(x, dtype=np.int64) for x in inputs]))
    state = tier._state()
    assert np.array_equal(state["buckets"], held)
    assert state["weights"].shape == (len(held), len(LABELS))
    assert state["seen"].tolist() == [label in set(answers) for label in LABELS]
