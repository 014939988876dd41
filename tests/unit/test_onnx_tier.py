"""The ONNX tier: a packaged sentence encoder and a softmax head learned online, served as ONNX."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cascade.config import CascadeConfig, OnnxTierConfig
from cascade.routing.build import build_tier
from cascade.routing.cascade import Cascade
from cascade.tiers.base import SnapshotError
from cascade.tiers.encoders import BUILTIN_ENCODERS, EncoderNotFound, resolve_encoder
from cascade.tiers.onnx import HEAD_INPUT, HEAD_OUTPUT, NgramInput, OnnxTier, head_model
from tests.unit.streams import LLM, easy_and_hard, event

LABELS = ["fear", "joy"]


@pytest.fixture(scope="module")
def tier_config():
    return OnnxTierConfig(name="onnx", cost=5.0, head_learning_rate=0.5)


@pytest.fixture(scope="module")
def encoder(tier_config):
    return OnnxTier(tier_config, LABELS).encoder


def fresh(tier_config, encoder, labels=LABELS):
    return OnnxTier(tier_config, labels, encoder=encoder)


def separable(n, dim, k, seed):
    """Unit vectors around k well-separated centres; the label is the centre."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    y = rng.integers(0, k, size=n)
    x = centres[y] + 0.3 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return list(x.astype(np.float32)), y


def test_builtin_encoders_resolve_from_installed_packages():
    for name in BUILTIN_ENCODERS:
        model, tokenizer = resolve_encoder(name, None, None)
        assert model.suffix == ".onnx" and model.is_file()
        assert tokenizer.name == "tokenizer.json" and tokenizer.is_file()
    with pytest.raises(EncoderNotFound):
        resolve_encoder("no-such-encoder", None, None)


def test_embeddings_have_the_encoder_shape_and_are_deterministic(tier_config, encoder):
    tier = fresh(tier_config, encoder)
    texts = ["I was so happy when she came home.", "A dark street at night scared me.", "ok", "x " * 400]
    events = [event(i, t, None) for i, t in enumerate(texts)]
    first = np.stack(tier.prepare(events))
    assert first.shape == (4, encoder.dim) == (4, 384)
    assert first.dtype == np.float32
    assert np.allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
    # Same text, same vector, whatever else shares its batch and in whatever order.
    again = np.stack(tier.prepare(events[::-1]))[::-1]
    alone = np.stack(tier.prepare(events[1:2]))
    assert np.allclose(first, again, atol=1e-5)
    assert np.allclose(first[1], alone[0], atol=1e-5)
    # Related texts are closer than unrelated ones.
    a, b, c = tier.embed(["I am very happy today", "Today I feel really glad", "The train timetable changed"])
    assert a @ b > a @ c


def test_the_head_learns_a_separable_task(tier_config, encoder):
    labels = ["a", "b", "c", "d"]
    tier = fresh(tier_config, encoder, labels)
    x, y = separable(600, encoder.dim, 4, seed=1)
    assert np.allclose(tier.predict_proba(x[:5]), 0.25)  # nothing learned: uniform
    for i in range(0, 400, 8):  # mini-batches, as demonstrations arrive
        tier.learn(x[i : i + 8], [labels[j] for j in y[i : i + 8]])
    assert tier.version == 400
    probs = tier.predict_proba(x[400:])
    assert probs.shape == (200, 4)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs.argmax(axis=1) == y[400:]).mean() >= 0.95


def test_the_onnx_head_equals_the_numpy_math(tier_config, encoder):
    labels = ["a", "b", "c"]
    tier = fresh(tier_config, encoder, labels)
    x, y = separable(200, encoder.dim, 3, seed=2)
    tier.learn(x[:100], [labels[j] for j in y[:100]])
    assert np.allclose(tier.predict_proba(x[100:]), tier.numpy_proba(x[100:]), atol=1e-6)
    # The session is cached while the head is unchanged and rebuilt after it learns.
    session = tier._head_session()
    assert tier._head_session() is session
    tier.learn(x[100:110], [labels[j] for j in y[100:110]])
    assert tier._head_session() is not session
    assert np.allclose(tier.predict_proba(x[150:]), tier.numpy_proba(x[150:]), atol=1e-6)
    # A plain onnxruntime session over the head's bytes (what a server runs) gives the same.
    served = ort.InferenceSession(tier.head_bytes(), providers=["CPUExecutionProvider"])
    (probs,) = served.run([HEAD_OUTPUT], {HEAD_INPUT: np.stack(x[150:])})
    assert np.allclose(probs, tier.predict_proba(x[150:]), atol=1e-6)


def test_head_model_is_matmul_add_softmax():
    model = head_model(np.ones((4, 3), dtype=np.float32), np.zeros(3, dtype=np.float32))
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "Softmax"]


def test_snapshot_round_trip_gives_identical_probabilities(tier_config, encoder):
    tier = fresh(tier_config, encoder)
    events = [e for e, _ in easy_and_hard(120, seed=3)]
    inputs = tier.prepare(events)
    tier.learn(inputs[:80], [e.payload["llm"][LLM] for e in events[:80]])
    blob = tier.snapshot()
    restored = fresh(tier_config, encoder)
    restored.restore(blob)
    assert restored.version == tier.version == 80
    assert np.array_equal(restored.predict_proba(inputs[80:]), tier.predict_proba(inputs[80:]))
    # The restored head goes on learning exactly like the original (AdaGrad state included).
    more = [e.payload["llm"][LLM] for e in events[80:100]]
    tier.learn(inputs[80:100], more)
    restored.learn(inputs[80:100], more)
    assert np.array_equal(restored.predict_proba(inputs[100:]), tier.predict_proba(inputs[100:]))
    with pytest.raises(SnapshotError):
        fresh(tier_config, encoder, ["a", "b"]).restore(blob)


def test_build_tier_and_a_three_tier_cascade_runs():
    config = CascadeConfig(
        task={"name": "t", "labels": LABELS},
        tiers=[{"name": "logistic", "kind": "logistic", "cost": 1.0},
               {"name": "onnx", "kind": "onnx", "cost": 5.0, "batch_size": 8, "threads": 1}],
        llm={"name": LLM}, deferral={"warmup": 20},
    )
    assert isinstance(build_tier(config, 1), OnnxTier)
    cascade = Cascade(config)
    stream = easy_and_hard(160, seed=4)
    for i in range(0, len(stream), 16):
        outcomes = cascade.process([e for e, _ in stream[i : i + 16]])
        assert len(outcomes) == len(stream[i : i + 16])
    onnx_stage = cascade.stages[1]
    assert onnx_stage.tier.version > 0
    # The ONNX stage's policy features carry the logistic tier's after its own.
    out = onnx_stage.route([e for e, _ in stream[:4]])
    assert len(out.output(0).policy_features) > 0


@pytest.fixture(scope="module")
def ngram_config():
    return OnnxTierConfig(name="onnx", cost=5.0, head_ngrams=2**12)


def test_the_ngram_head_equals_the_numpy_math_and_the_served_graph(ngram_config, encoder):
    tier = OnnxTier(ngram_config, LABELS, encoder=encoder)
    events = [e for e, _ in easy_and_hard(120, seed=5)]
    inputs = tier.prepare(events)
    assert isinstance(inputs[0], NgramInput) and len(inputs[0].ids) == len(inputs[0].vals) > 0
    assert np.allclose(tier.predict_proba(inputs[:4]), 0.5)
    tier.learn(inputs[:80], [e.payload["llm"][LLM] for e in events[:80]])
    assert np.abs(tier.Wn).sum() > 0  # the n-gram table learned
    session = tier._head_session()
    probs = tier.predict_proba(inputs[80:])
    assert np.allclose(probs, tier.numpy_proba(inputs[80:]), atol=1e-6)
    assert tier._head_session() is session  # weights are fed, the session outlives learning
    served = ort.InferenceSession(tier.head_bytes(), providers=["CPUExecutionProvider"])
    (out,) = served.run([HEAD_OUTPUT], tier._feeds(inputs[80:]))
    assert np.allclose(out, probs, atol=1e-6)
    model_ops = [n.op_type for n in onnx.load_from_string(tier.head_bytes()).graph.node]
    assert "Gather" in model_ops and "Softmax" in model_ops


def test_the_ngram_head_learns_from_words_alone(ngram_config, encoder):
    # The same embedding for every event: only the n-grams can tell the labels apart.
    tier = OnnxTier(ngram_config, LABELS, encoder=encoder)
    flat = np.zeros(encoder.dim, dtype=np.float32)
    words = {"fear": "dark scary night", "joy": "sunny happy party"}
    rows = [(LABELS[i % 2], NgramInput(flat, *_hashed(tier, words[LABELS[i % 2]] + f" w{i}"))) for i in range(200)]
    for i in range(0, 160, 8):
        tier.learn([x for _, x in rows[i : i + 8]], [y for y, _ in rows[i : i + 8]])
    probs = tier.predict_proba([x for _, x in rows[160:]])
    assert (np.array(LABELS)[probs.argmax(axis=1)] == [y for y, _ in rows[160:]]).all()


def _hashed(tier, text):
    v = tier.ngrams.transform(text)
    return np.fromiter(v.keys(), np.int64, len(v)), np.fromiter(v.values(), np.float32, len(v))


def test_ngram_head_snapshot_round_trip(ngram_config, encoder):
    tier = OnnxTier(ngram_config, LABELS, encoder=encoder)
    events = [e for e, _ in easy_and_hard(120, seed=6)]
    inputs = tier.prepare(events)
    tier.learn(inputs[:80], [e.payload["llm"][LLM] for e in events[:80]])
    restored = OnnxTier(ngram_config, LABELS, encoder=encoder)
    restored.restore(tier.snapshot())
    assert np.array_equal(restored.predict_proba(inputs[80:]), tier.predict_proba(inputs[80:]))
    more = [e.payload["llm"][LLM] for e in events[80:100]]
    tier.learn(inputs[80:100], more)
    restored.learn(inputs[80:100], more)
    assert np.array_equal(restored.predict_proba(inputs[100:]), tier.predict_proba(inputs[100:]))
    # A head with an n-gram table cannot restore into a tier without one, nor the reverse.
    with pytest.raises(SnapshotError):
        fresh(OnnxTierConfig(name="onnx"), encoder).restore(tier.snapshot())
    with pytest.raises(SnapshotError):
        OnnxTier(ngram_config, LABELS, encoder=encoder).restore(fresh(OnnxTierConfig(name="onnx"), encoder).snapshot())
