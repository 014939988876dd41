import numpy as np
import pytest

from cascade.config import FeatureConfig
from cascade.tiers.nblr import NblrTier
from tests.unit.streams import LLM, easy_and_hard

LABELS = ["fear", "joy"]
FEATURES = FeatureConfig(n_features=2**12)


def make(nb_scaling: bool = True) -> NblrTier:
    return NblrTier("nblr", LABELS, 1.0, FEATURES, nb_scaling=nb_scaling)


def easy_stream(n: int, seed: int) -> list:
    """Events whose LLM answer a telling word decides: separable by their n-grams."""
    return [e for e, kind in easy_and_hard(n, seed) if kind == "easy"]


def prequential(tier: NblrTier, events: list) -> list[bool]:
    agree = []
    for e in events:
        inputs = tier.prepare([e])
        answer = e.payload["llm"][LLM]
        agree.append(LABELS[int(tier.predict_proba(inputs)[0].argmax())] == answer)
        tier.learn(inputs, [answer])
    return agree


@pytest.mark.parametrize("nb_scaling", [True, False])
def test_learns_a_separable_stream(nb_scaling):
    tier = make(nb_scaling)
    events = easy_stream(600, seed=1)
    agree = prequential(tier, events)
    assert tier.version == len(events)
    assert np.mean(agree[len(agree) // 2 :]) > 0.97


def test_deterministic():
    events = easy_stream(200, seed=2)
    a, b = make(), make()
    prequential(a, events)
    prequential(b, events)
    inputs = a.prepare(events)
    assert np.array_equal(a.predict_proba(inputs), b.predict_proba(inputs))


def test_uniform_before_learning_and_rows_are_distributions():
    tier = make()
    events = easy_stream(100, seed=3)
    inputs = tier.prepare(events)
    assert np.allclose(tier.predict_proba(inputs), 0.5)
    tier.learn(inputs, [e.payload["llm"][LLM] for e in events])
    probs = tier.predict_proba([*inputs, {}])  # an event without any n-gram too
    assert probs.shape == (len(events) + 1, len(LABELS))
    assert np.allclose(probs.sum(axis=1), 1.0)


@pytest.mark.parametrize("nb_scaling", [True, False])
def test_batch_equals_one_at_a_time(nb_scaling):
    tier = make(nb_scaling)
    prequential(tier, easy_stream(200, seed=4))
    events = [e for e, _ in easy_and_hard(100, seed=5)]
    batch = tier.predict_proba(tier.prepare(events))  # featurised as one CSR batch
    single = np.vstack([tier.predict_proba(tier.prepare([e])) for e in events])
    assert np.allclose(batch, single)


def test_batch_learning_equals_one_at_a_time():
    events = easy_stream(200, seed=6)
    answers = [e.payload["llm"][LLM] for e in events]
    a, b = make(), make()
    a.learn(a.prepare(events), answers)
    for e, y in zip(events, answers):
        inputs = b.prepare([e])
        b.predict_proba(inputs)  # the pending forward pass is reused by learn
        b.learn(inputs, [y])
    inputs = a.prepare(events)
    assert a.version == b.version == len(events)
    assert np.allclose(a.predict_proba(inputs), b.predict_proba(inputs))


def test_refuses_unknown_labels():
    tier = make()
    inputs = tier.prepare(easy_stream(20, seed=7)[:2])
    with pytest.raises(ValueError, match="surprise"):
        tier.learn(inputs, ["joy", "surprise"])
    assert tier.version == 0
    assert np.allclose(tier.predict_proba(inputs), 0.5)  # nothing was learned from the batch


def _assert_data_only(node, path="state"):
    if isinstance(node, dict):
        for key, value in node.items():
            assert isinstance(key, str), f"{path}: key {key!r}"
            _assert_data_only(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _assert_data_only(value, f"{path}[{i}]")
    else:
        assert node is None or type(node) in (str, int, float, bool, np.ndarray), f"{path}: {type(node)}"
        if isinstance(node, np.ndarray):
            assert node.dtype.kind in "biuf", f"{path}: dtype {node.dtype}"


@pytest.mark.parametrize("nb_scaling", [True, False])
def test_state_round_trip(nb_scaling):
    tier = make(nb_scaling)
    prequential(tier, easy_stream(200, seed=8))
    state = tier._state()
    _assert_data_only(state)
    fresh = make(nb_scaling)
    fresh._load_state(state)
    fresh.version = tier.version
    probe = [e for e, _ in easy_and_hard(60, seed=9)]
    assert np.array_equal(fresh.predict_proba(fresh.prepare(probe)), tier.predict_proba(tier.prepare(probe)))
    more = easy_stream(200, seed=10)
    assert prequential(fresh, more) == prequential(tier, more)
    assert np.array_equal(fresh.predict_proba(fresh.prepare(probe)), tier.predict_proba(tier.prepare(probe)))


def test_state_of_another_configuration_is_refused():
    tier = make()
    prequential(tier, easy_stream(50, seed=11))
    with pytest.raises(ValueError, match="nb_scaling"):
        make(nb_scaling=False)._load_state(tier._state())
