"""Tier 2: a small ONNX sentence encoder and a softmax head learned online, both run by onnxruntime.

``prepare`` embeds each event once (batched; the encoder of ``cascade/tiers/encoders.py``), and
the embedding is what prediction, the deferral policy and learning reuse. The head is a softmax
regression over the embedding, learned from LLM demonstrations in mini-batches with AdaGrad in
numpy. Its snapshot is an ONNX graph (MatMul + Add + Softmax) built with the ``onnx`` helper
API, so whoever serves the tier runs the head in onnxruntime only; ``predict_proba`` runs that
same graph, re-building its session only when the head has learned since.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from cascade.config import TierConfig
from cascade.messages import Event
from cascade.tiers.base import SnapshotError, Tier
from cascade.tiers.encoders import SentenceEncoder, resolve_encoder, session_options

HEAD_INPUT, HEAD_OUTPUT = "embedding", "probs"
_OPSET = 13
_EPS = 1e-8


def head_model(weights: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """probs = softmax(embedding @ W + b) as an ONNX model (batch × dim → batch × labels)."""
    dim, k = weights.shape
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [HEAD_INPUT, "W"], ["logits0"]),
            helper.make_node("Add", ["logits0", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], [HEAD_OUTPUT], axis=1),
        ],
        "cascade_softmax_head",
        [helper.make_tensor_value_info(HEAD_INPUT, TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info(HEAD_OUTPUT, TensorProto.FLOAT, ["batch", k])],
        initializer=[
            numpy_helper.from_array(np.ascontiguousarray(weights, dtype=np.float32), "W"),
            numpy_helper.from_array(np.ascontiguousarray(bias, dtype=np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="cascade")
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model


def head_weights(model_bytes: bytes) -> tuple[np.ndarray, np.ndarray]:
    model = onnx.load_from_string(model_bytes)
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    if set(init) != {"W", "b"}:
        raise SnapshotError(f"not a softmax head: initializers {sorted(init)}")
    return init["W"].astype(np.float32), init["b"].astype(np.float32)


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class OnnxTier(Tier):
    kind = "onnx"

    def __init__(self, config: TierConfig, labels: Sequence[str], encoder: SentenceEncoder | None = None) -> None:
        super().__init__(config.name, labels, config.cost)
        self.config = config
        if encoder is None:
            model_path, tokenizer_path = resolve_encoder(config.encoder, config.encoder_path, config.tokenizer_path)
            encoder = SentenceEncoder(
                model_path, tokenizer_path, output=config.encoder_output, max_length=config.max_length,
                batch_size=config.batch_size, threads=config.threads,
            )
        self.encoder = encoder
        self.index = {label: j for j, label in enumerate(self.labels)}
        k, d = len(self.labels), encoder.dim
        self.W = np.zeros((d, k), dtype=np.float32)
        self.b = np.zeros(k, dtype=np.float32)
        self.G_W = np.zeros((d, k), dtype=np.float32)  # AdaGrad's sums of squared gradients
        self.G_b = np.zeros(k, dtype=np.float32)
        self._session: ort.InferenceSession | None = None
        self._session_version = -1
        self.cache: dict[str, np.ndarray] = {}
        if config.embedding_cache is not None:
            self._load_cache(config.embedding_cache)

    def _load_cache(self, path: Any) -> None:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != self.encoder.fingerprint:
                raise ValueError(
                    f"embedding cache {path} was made by encoder {z['fingerprint']}, this tier runs {self.encoder.fingerprint}"
                )
            self.cache = dict(zip(z["keys"].tolist(), z["embeddings"]))

    # -- inputs ------------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not self.cache:
            return self.encoder.encode(texts)
        keys = [text_key(t) for t in texts]
        miss = [i for i, k in enumerate(keys) if k not in self.cache]
        out = np.empty((len(texts), self.encoder.dim), dtype=np.float32)
        if miss:
            out[miss] = self.encoder.encode([texts[i] for i in miss])
        for i, k in enumerate(keys):
            if k in self.cache:
                out[i] = self.cache[k]
        return out

    def prepare(self, events: Sequence[Event]) -> list[np.ndarray]:
        """One embedding per event (float32, L2-normalised), computed in encoder batches."""
        return list(self.embed([e.text for e in events]))

    # -- the head ----------------------------------------------------------------------------

    def head_bytes(self) -> bytes:
        return head_model(self.W, self.b).SerializeToString()

    def _head_session(self) -> ort.InferenceSession:
        if self._session is None or self._session_version != self.version:
            opts = session_options(1)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # three nodes: nothing to gain
            self._session = ort.InferenceSession(self.head_bytes(), sess_options=opts, providers=["CPUExecutionProvider"])
            self._session_version = self.version
        return self._session

    def predict_proba(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        n, k = len(inputs), len(self.labels)
        if n == 0:
            return np.zeros((0, k))
        if self.version == 0:
            return np.full((n, k), 1.0 / k)
        x = np.ascontiguousarray(np.stack(inputs), dtype=np.float32)
        (probs,) = self._head_session().run([HEAD_OUTPUT], {HEAD_INPUT: x})
        return probs.astype(np.float64)

    def numpy_proba(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """The head's math in numpy (what learning uses); equals the ONNX graph's output."""
        z = np.stack(inputs).astype(np.float32) @ self.W + self.b
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def _learn(self, inputs: Sequence[np.ndarray], labels: Sequence[str]) -> None:
        rows = [(x, self.index[y]) for x, y in zip(inputs, labels) if y in self.index]
        lr, l2, m = self.config.head_learning_rate, self.config.l2, self.config.head_batch_size
        for start in range(0, len(rows), m):
            chunk = rows[start : start + m]
            x = np.stack([c[0] for c in chunk]).astype(np.float32)
            y = np.zeros((len(chunk), len(self.labels)), dtype=np.float32)
            y[np.arange(len(chunk)), [c[1] for c in chunk]] = 1.0
            err = (self.numpy_proba(list(x)) - y) / len(chunk)
            g_w = x.T @ err
            if l2:
                g_w += l2 * self.W
            g_b = err.sum(axis=0)
            self.G_W += g_w * g_w
            self.G_b += g_b * g_b
            self.W -= lr * g_w / (np.sqrt(self.G_W) + _EPS)
            self.b -= lr * g_b / (np.sqrt(self.G_b) + _EPS)

    # -- snapshots ---------------------------------------------------------------------------

    def _state(self) -> Any:
        return {
            "encoder": self.encoder.fingerprint,
            "head_onnx": self.head_bytes(),
            "adagrad": (self.G_W.copy(), self.G_b.copy()),  # for a learner that restores and goes on
        }

    def _load_state(self, state: Any) -> None:
        if state["encoder"] != self.encoder.fingerprint:
            raise SnapshotError(f"snapshot of a head over {state['encoder']} cannot serve {self.encoder.fingerprint}")
        W, b = head_weights(state["head_onnx"])
        if W.shape != self.W.shape:
            raise SnapshotError(f"head shape {W.shape} differs from {self.W.shape}")
        self.W, self.b = W, b
        self.G_W, self.G_b = (a.astype(np.float32).copy() for a in state["adagrad"])
        self._session = None
