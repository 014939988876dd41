import copy
import functools
import hashlib
import io
import json
import math
import pickle
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.river_logistic import RiverLogisticTier
from cascade.config import LogisticTierConfig, OnnxTierConfig
from cascade.deferral.policy import DeferralPolicy
from cascade.routing.cascade import Cascade
from cascade.snapshots import SCHEMA_VERSION, decode_snapshot, encode_snapshot
from cascade.tiers.base import SnapshotError
from cascade.tiers.logistic import LogisticTier
from cascade.tiers.onnx import NgramInput, OnnxTier
from tests.unit.streams import LLM, easy_and_hard
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


# -- the data-only format ---------------------------------------------------------------------

LABELS = ["fear", "joy"]


class StubEncoder:
    """Stands in for the ONNX tier's sentence encoder: these tests hand the head embeddings."""

    dim = 8
    fingerprint = "stub-encoder"


def logistic_tier(optimizer: str = "adagrad") -> LogisticTier:
    return LogisticTier(LogisticTierConfig(name="logistic", optimizer=optimizer, l2=1e-4), LABELS, make_config().features)


def onnx_tier(head_ngrams: int = 0) -> OnnxTier:
    config = OnnxTierConfig(name="onnx", kind="onnx", head_ngrams=head_ngrams)
    return OnnxTier(config, LABELS, encoder=StubEncoder())  # type: ignore[arg-type]


def onnx_inputs(tier: OnnxTier, n: int, seed: int) -> tuple[list, list[str]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, StubEncoder.dim)).astype(np.float32) + y[:, None]
    if tier.Wn is None:
        return list(x), [LABELS[i] for i in y]
    ids = [rng.choice(tier.Wn.shape[0], 3, replace=False) + 0 for _ in range(n)]
    return [NgramInput(e, i.astype(np.int64), np.full(3, 0.5, np.float32)) for e, i in zip(x, ids)], [LABELS[i] for i in y]


def river_logistic_tier(optimizer: str = "adagrad") -> RiverLogisticTier:
    """The river tier earlier versions ran: its snapshots are in river's format."""
    config = LogisticTierConfig(name="logistic", optimizer=optimizer, l2=1e-4)
    return RiverLogisticTier(config, LABELS, make_config().features)


def logistic_data(tier: LogisticTier, n: int, seed: int) -> tuple[list, list[str]]:
    stream = easy_and_hard(n, seed=seed)
    return list(tier.prepare([e for e, _ in stream])), [e.payload["llm"][LLM] for e, _ in stream]


def policy_data(n: int, seed: int) -> tuple[np.ndarray, list[bool]]:
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, 6))
    return features, list(features[:, 0] + 0.5 * rng.normal(size=n) > -0.3)


def new_policy() -> DeferralPolicy:
    return DeferralPolicy("logistic", make_config().deferral)


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
def test_logistic_tier_goes_on_learning_exactly_after_a_restore(optimizer):
    a, b = logistic_tier(optimizer), logistic_tier(optimizer)
    x1, y1 = logistic_data(a, 200, seed=21)
    x2, y2 = logistic_data(a, 200, seed=22)
    test, _ = logistic_data(a, 60, seed=23)
    a.learn(x1, y1)
    b.restore(a.snapshot())
    assert b.version == a.version == 200
    assert np.array_equal(b.predict_proba(test), a.predict_proba(test))
    a.learn(x2, y2)
    b.learn(x2, y2)
    assert np.allclose(b.predict_proba(test), a.predict_proba(test), rtol=0, atol=1e-15)
    assert b.snapshot() == a.snapshot()  # every weight, squared-gradient sum and step count


@pytest.mark.parametrize("head_ngrams", [0, 64])
def test_onnx_tier_goes_on_learning_exactly_after_a_restore(head_ngrams):
    a, b = onnx_tier(head_ngrams), onnx_tier(head_ngrams)
    x, y = onnx_inputs(a, 300, seed=31)
    a.learn(x[:100], y[:100])
    b.restore(a.snapshot())
    assert np.array_equal(b.predict_proba(x[200:]), a.predict_proba(x[200:]))
    a.learn(x[100:200], y[100:200])
    b.learn(x[100:200], y[100:200])
    assert np.array_equal(b.predict_proba(x[200:]), a.predict_proba(x[200:]))
    assert b.snapshot() == a.snapshot()
    with pytest.raises(SnapshotError, match="n-gram table"):
        onnx_tier(0 if head_ngrams else 64).restore(a.snapshot())


def test_policy_goes_on_learning_exactly_after_a_restore():
    a, b = new_policy(), new_policy()
    f1, ok1 = policy_data(300, seed=41)
    f2, ok2 = policy_data(300, seed=42)
    a.learn(f1, ok1)
    b.restore(a.snapshot())
    assert (b.version, b.demonstrations, b.since_drift, b.drifts) == (a.version, a.demonstrations, a.since_drift, a.drifts)
    assert np.array_equal(b.p_agree(f2), a.p_agree(f2)) and b.exploration() == a.exploration()
    # ADWIN's window is not in the snapshot (river keeps it in Rust): B's detector starts empty.
    assert b.adwin.width == 0 and b.adwin.delta == a.adwin.delta
    a.learn(f2, ok2)
    b.learn(f2, ok2)
    assert np.allclose(b.p_agree(f1), a.p_agree(f1), rtol=0, atol=1e-15)
    assert b.model.weights == a.model.weights and b.model.intercept == a.model.intercept
    assert b.model.optimizer.g2 == a.model.optimizer.g2
    assert b.model.optimizer.n_iterations == a.model.optimizer.n_iterations == 600


def test_a_snapshot_is_header_manifest_and_npy_payloads():
    blob = encode_snapshot("thing", 7, {"a": [1, 2.5, None, True, "x"], "w": np.arange(3.0), "raw": b"\x00\x01"})
    assert blob[:6] == b"CSNAPD" and struct.unpack(">H", blob[6:8]) == (SCHEMA_VERSION,)
    version, state = decode_snapshot(blob, "thing")
    assert version == 7 and state["a"] == [1, 2.5, None, True, "x"] and state["raw"] == b"\x00\x01"
    assert state["w"].dtype == np.float64 and np.array_equal(state["w"], np.arange(3.0))
    with pytest.raises(TypeError, match="state.bad"):
        encode_snapshot("thing", 1, {"bad": {1, 2}})
    with pytest.raises(TypeError, match="leading"):
        encode_snapshot("thing", 1, {"$npy": 0})  # would read as a reference to a payload
    with pytest.raises(TypeError, match="dtype object"):
        encode_snapshot("thing", 1, {"o": np.array([object()])})


class Plant:
    """Unpickling this creates a file: proof that code ran."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def frame(body: bytes, schema: int = SCHEMA_VERSION, length: int | None = None) -> bytes:
    """A header with a correct sha256 (unless told otherwise) in front of any body."""
    size = len(body) if length is None else length
    return b"CSNAPD" + struct.pack(">HQ", schema, size) + hashlib.sha256(body).digest() + body


def with_manifest(manifest: dict, payloads: bytes = b"") -> bytes:
    raw = json.dumps(manifest).encode()
    return frame(struct.pack(">I", len(raw)) + raw + payloads)


def test_pickles_are_refused_and_never_run(tmp_path):
    planted = tmp_path / "planted"
    Plant.path = str(planted)
    payload = pickle.dumps({"kind": "logistic", "version": 1, "state": Plant()})
    pickled_npy = io.BytesIO()
    np.save(pickled_npy, np.array([Plant()], dtype=object), allow_pickle=True)
    blobs = [
        b"CSNAP1" + payload,  # the old format
        frame(payload),  # a pickle behind a valid header and checksum
        with_manifest(  # a pickled object array as a payload
            {"kind": "logistic", "version": 1, "payloads": [[0, len(pickled_npy.getvalue())]],
             "state": {"labels": LABELS, "model": {"w": {"$npy": 0}}}},
            pickled_npy.getvalue(),
        ),
        with_manifest(  # a pickle as a bytes payload, where the model should be
            {"kind": "logistic", "version": 1, "payloads": [[0, len(payload)]], "state": {"labels": LABELS, "model": {"$bytes": 0}}},
            payload,
        ),
    ]
    for blob in blobs:
        for target in (logistic_tier(), onnx_tier(), new_policy()):
            with pytest.raises(SnapshotError):
                target.restore(blob)
    with pytest.raises(SnapshotError, match="pickled"):
        decode_snapshot(blobs[0], "logistic")
    assert not planted.exists()


def test_damaged_snapshots_are_refused_with_a_reason(trained):
    tier = trained.stages[0].tier
    blob = tier.snapshot()
    cases = [
        ("truncated", blob[:-1]),
        ("truncated", blob[:20]),
        ("padded", blob + b"\x00"),
        ("sha256", blob[:-5] + bytes([blob[-5] ^ 0x01]) + blob[-4:]),  # one bit of a payload
        ("not a cascade snapshot", b"garbage"),
        ("schema version 2", blob[:6] + struct.pack(">H", 2) + blob[8:]),
        ("over the limit", blob[:8] + struct.pack(">Q", 2**40) + blob[16:]),
        ("cannot restore a 'logistic'", trained.stages[0].policy.snapshot()),
        ("not JSON", frame(struct.pack(">I", 3) + b"{x}")),
        ("overruns", frame(struct.pack(">I", 99) + b"{}")),
        ("not within", with_manifest({"kind": "logistic", "version": 1, "payloads": [[0, 10]], "state": {}})),
        ("malformed reference", with_manifest({"kind": "logistic", "version": 1, "payloads": [], "state": {"$npy": 0}})),
        ("not a count", with_manifest({"kind": "logistic", "version": -1, "payloads": [], "state": {}})),
    ]
    for reason, bad in cases:
        with pytest.raises(SnapshotError, match=reason):
            decode_snapshot(bad, "logistic")
    for i in range(0, len(blob), max(1, len(blob) // 300)):  # every part of the blob, one bit each
        with pytest.raises(SnapshotError):
            decode_snapshot(blob[:i] + bytes([blob[i] ^ 0x10]) + blob[i + 1 :], "logistic")


def reencode(blob: bytes, kind: str, change) -> bytes:
    version, state = decode_snapshot(blob, kind)
    change(state)
    return encode_snapshot(kind, version, state)


def test_refused_restores_change_nothing(trained):
    tier, policy = copy.deepcopy(trained.stages[0].tier), copy.deepcopy(trained.stages[0].policy)
    other_tier, river_tier, other_policy = logistic_tier(), river_logistic_tier(), new_policy()
    other_tier.learn(*logistic_data(other_tier, 50, seed=5))
    river_tier.learn(*logistic_data(river_tier, 50, seed=5))
    other_policy.learn(*policy_data(50, seed=5))
    # good_tier: river's format, which a restore converts; good_numpy: the tier's own.
    good_tier, good_numpy, good_policy = river_tier.snapshot(), other_tier.snapshot(), other_policy.snapshot()
    before = tier.snapshot(), tier.version, policy.snapshot(), policy.version

    def last_optimizer_bad(state):  # refused only after the first label's weights were read
        state["model"]["classes"][-1]["optimizer"]["type"] = "Adam"

    bad_tier = [
        reencode(good_tier, "logistic", last_optimizer_bad),
        reencode(good_tier, "logistic", lambda s: s.update(labels=["a", "b"])),
        reencode(good_tier, "logistic", lambda s: s["model"]["classes"][0].update(label="anger")),
        reencode(good_tier, "logistic", lambda s: s["model"]["classes"][0]["weights"].update(keys=np.array([2**40]))),
        reencode(good_tier, "logistic", lambda s: s["model"]["classes"][0]["weights"].update(values=np.zeros(1))),
        reencode(good_tier, "logistic", lambda s: s["model"]["classes"][-1]["optimizer"].update(lr=0.5)),
        reencode(good_numpy, "logistic", lambda s: s["model"].update(n_features=2**10)),
        reencode(good_numpy, "logistic", lambda s: s["model"].update(buckets=s["model"]["buckets"] + 2**30)),
        reencode(good_numpy, "logistic", lambda s: s["model"].update(adagrad=s["model"]["adagrad"][:-1])),
        reencode(good_numpy, "logistic", lambda s: s["model"].pop("seen")),
    ]
    bad_policy = [
        reencode(good_policy, "deferral", lambda s: s.update(drifts=-1)),
        reencode(good_policy, "deferral", lambda s: s.update(tier="onnx")),
        reencode(good_policy, "deferral", lambda s: s["adwin"].update(clock=0)),
        reencode(good_policy, "deferral", lambda s: s["model"]["weights"].update(keys=np.zeros(2, dtype=np.float64))),
    ]
    for blob in bad_tier:
        with pytest.raises(SnapshotError):
            tier.restore(blob)
    for blob in bad_policy:
        with pytest.raises(SnapshotError):
            policy.restore(blob)
    assert (tier.snapshot(), tier.version, policy.snapshot(), policy.version) == before


# -- property-based: whatever the bytes, SnapshotError or a usable model ----------------------

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROBE = np.random.default_rng(7).normal(size=(3, 6))


@functools.cache
def good_snapshots() -> dict[str, tuple[bytes, Any]]:
    """A trained snapshot of each kind of target, and the inputs to check a restored one on."""
    tier, onnx_plain, onnx_ngrams, policy = logistic_tier(), onnx_tier(0), onnx_tier(16), new_policy()
    tier.learn(*logistic_data(tier, 60, seed=3))
    probes = {"logistic": logistic_data(tier, 5, seed=4)[0]}
    for name, t in (("onnx", onnx_plain), ("onnx_ngrams", onnx_ngrams)):
        x, y = onnx_inputs(t, 40, seed=5)
        t.learn(x, y)
        probes[name] = x[:5]
    policy.learn(*policy_data(60, seed=6))
    river = river_logistic_tier()  # river's format: converted by the numpy tier's restore
    river.learn(*logistic_data(river, 60, seed=3))
    probes["logistic_river"] = probes["logistic"]
    blobs = {"logistic": tier.snapshot(), "logistic_river": river.snapshot(), "onnx": onnx_plain.snapshot(),
             "onnx_ngrams": onnx_ngrams.snapshot(), "deferral": policy.snapshot()}
    return {name: (blobs[name], probes.get(name, PROBE)) for name in blobs}


TARGETS = {"logistic": logistic_tier, "logistic_river": logistic_tier, "onnx": lambda: onnx_tier(0), "onnx_ngrams": lambda: onnx_tier(16), "deferral": new_policy}


def restore_or_refuse(name: str, blob: bytes) -> None:
    """restore either refuses with SnapshotError or leaves a model that predicts."""
    target = TARGETS[name]()
    try:
        target.restore(blob)
    except SnapshotError:
        return
    probe = good_snapshots()[name][1]
    out = target.p_agree(probe) if name == "deferral" else target.predict_proba(probe)
    assert out.shape[0] == len(probe)


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(sorted(TARGETS)))
def test_arbitrary_bytes_are_refused(blob, name):
    with pytest.raises(SnapshotError):
        decode_snapshot(blob, "logistic")
    restore_or_refuse(name, blob)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(sorted(TARGETS)))
def test_arbitrary_bodies_behind_a_valid_header_are_refused(body, name):
    with pytest.raises(SnapshotError):
        decode_snapshot(frame(body), "logistic")
    restore_or_refuse(name, frame(body))


@FUZZ
@given(st.sampled_from(sorted(TARGETS)), st.data())
def test_damaged_bodies_with_a_recomputed_checksum_restore_or_are_refused(name, data):
    blob = good_snapshots()[name][0]
    body = bytearray(blob[48:])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    restore_or_refuse(name, frame(bytes(body[:cut] if data.draw(st.booleans()) else body)))


JSON_LEAVES = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5)
ARRAYS = st.sampled_from([np.zeros(0), np.arange(3, dtype=np.int64), np.ones((2, 2), np.float32), np.array([True]),
                          np.full(2, 2**40, np.uint64), np.array([np.nan, -1.0])])
VALUES = st.recursive(JSON_LEAVES | ARRAYS | st.binary(max_size=4),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4).filter(lambda k: not k.startswith("$")), inner, max_size=3),
                      max_leaves=8)


def paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        out += paths(v, (*prefix, k))
    return out


@FUZZ
@given(st.sampled_from(sorted(TARGETS)), st.data())
def test_any_field_replaced_by_any_value_restores_or_is_refused(name, data):
    kind = "deferral" if name == "deferral" else name.split("_")[0]
    version, state = decode_snapshot(good_snapshots()[name][0], kind)
    path = data.draw(st.sampled_from(paths(state)[1:]))
    parent = state
    for k in path[:-1]:
        parent = parent[k]
    if data.draw(st.booleans()):
        parent[path[-1]] = data.draw(VALUES)
    elif isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent.pop(path[-1])
    restore_or_refuse(name, encode_snapshot(kind, version, state))


@FUZZ
@given(VALUES)
def test_any_data_tree_round_trips(state):
    _, back = decode_snapshot(encode_snapshot("x", 1, state), "x")

    def same(a, b):
        if isinstance(a, np.ndarray):
            return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
        if isinstance(a, (list, tuple)):
            return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, float):
            return isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b)))
        return type(a) is type(b) and a == b

    assert same(state, back)
