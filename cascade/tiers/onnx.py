"""Tier 2: a small ONNX sentence encoder and a softmax head learned online, both run by onnxruntime.

``prepare`` embeds each event once (batched; the encoder of ``cascade/tiers/encoders.py``), and
the embedding is what prediction, the deferral policy and learning reuse. The head is a softmax
regression over the embedding, learned from LLM demonstrations in mini-batches with AdaGrad in
numpy. ``predict_proba`` runs it as an ONNX graph (MatMul + Add + Softmax) built with the ``onnx``
helper API, so whoever serves the tier runs the head in onnxruntime only, re-building its session
only when the head has learned since. Its snapshot holds the weights and AdaGrad sums as arrays.

With ``head_ngrams`` > 0 the head also reads the text's hashed word uni- and bigrams (a sparse
linear part beside the embedding, its own AdaGrad step): the tier's input is then
``NgramInput`` (embedding, bucket ids, values) and the graph adds a Gather over the n-gram weight
table (``ngram_ids``, ``ngram_vals``: batch × n-grams, padded with value 0). In-process the
weights are fed to that graph as inputs, so learning never rebuilds its session. On ISEAR it
imitates the LLM better than the embedding alone (docs/benchmarks.md, ONNX section).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from cascade.config import FeatureConfig, OnnxTierConfig
from cascade.features import HashedNgrams
from cascade.messages import Event
from cascade.snapshots import array, field
from cascade.tiers.base import SnapshotError, Tier
from cascade.tiers.encoders import SentenceEncoder, resolve_encoder, session_options

HEAD_INPUT, HEAD_OUTPUT = "embedding", "probs"
NGRAM_IDS, NGRAM_VALS = "ngram_ids", "ngram_vals"
_OPSET = 13
_EPS = 1e-8


class NgramInput(NamedTuple):
    """The tier's input when its head reads n-grams too: the embedding and the hashed n-grams."""

    embedding: np.ndarray
    ids: np.ndarray  # int64 hash buckets
    vals: np.ndarray  # float32 weights (L2-normalised presence)


def head_model(
    weights: np.ndarray, bias: np.ndarray, ngram_weights: np.ndarray | None = None, *, weights_as_inputs: bool = False
) -> onnx.ModelProto:
    """probs = softmax(embedding @ W + b [+ sum_j vals_j * Wn[ids_j]]) as an ONNX model.

    ``weights_as_inputs`` makes W, b (and Wn) graph inputs instead of initializers: the same
    computation, fed the current weights on every run (what the learning process uses).
    """
    dim, k = weights.shape
    nodes = [helper.make_node("MatMul", [HEAD_INPUT, "W"], ["logits0"])]
    inputs = [helper.make_tensor_value_info(HEAD_INPUT, TensorProto.FLOAT, ["batch", dim])]
    params = {"W": weights, "b": bias}
    last = "logits0"
    if ngram_weights is not None:
        params["Wn"] = ngram_weights
        inputs += [
            helper.make_tensor_value_info(NGRAM_IDS, TensorProto.INT64, ["batch", "ngrams"]),
            helper.make_tensor_value_info(NGRAM_VALS, TensorProto.FLOAT, ["batch", "ngrams"]),
        ]
        nodes += [
            helper.make_node("Gather", ["Wn", NGRAM_IDS], ["rows"], axis=0),  # batch × ngrams × labels
            helper.make_node("Unsqueeze", [NGRAM_VALS, "axis2"], ["vals3"]),
            helper.make_node("Mul", ["rows", "vals3"], ["weighted"]),
            helper.make_node("ReduceSum", ["weighted", "axis1"], ["ngram_logits"], keepdims=0),
            helper.make_node("Add", ["logits0", "ngram_logits"], ["logits1"]),
        ]
        last = "logits1"
    nodes += [
        helper.make_node("Add", [last, "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [HEAD_OUTPUT], axis=1),
    ]
    consts = []
    if ngram_weights is not None:
        consts = [numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
                  numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")]
    arrays = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in params.items()}
    if weights_as_inputs:
        inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, list(a.shape)) for name, a in arrays.items()]
        initializer = consts
    else:
        initializer = [numpy_helper.from_array(a, name) for name, a in arrays.items()] + consts
    graph = helper.make_graph(
        nodes,
        "cascade_softmax_head",
        inputs,
        [helper.make_tensor_value_info(HEAD_OUTPUT, TensorProto.FLOAT, ["batch", k])],
        initializer=initializer,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name="cascade")
    model.ir_version = 8  # readable by every onnxruntime >= 1.14
    onnx.checker.check_model(model)
    return model


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class OnnxTier(Tier):
    kind = "onnx"

    def __init__(self, config: OnnxTierConfig, labels: Sequence[str], encoder: SentenceEncoder | None = None) -> None:
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
        self.ngrams: HashedNgrams | None = None
        self.Wn: np.ndarray | None = None
        self.G_Wn: np.ndarray | None = None
        if config.head_ngrams:
            self.ngrams = HashedNgrams(FeatureConfig(n_features=config.head_ngrams, ngram_max=2))
            self.Wn = np.zeros((config.head_ngrams, k), dtype=np.float32)
            self.G_Wn = np.zeros((config.head_ngrams, k), dtype=np.float32)
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

    def prepare(self, events: Sequence[Event]) -> list[Any]:
        """One embedding per event (float32, L2-normalised), computed in encoder batches; with
        ``head_ngrams``, an ``NgramInput`` of the embedding and the text's hashed n-grams."""
        embeddings = list(self.embed([e.text for e in events]))
        if self.ngrams is None:
            return embeddings
        out = []
        for e, x in zip(events, embeddings):
            v = self.ngrams.transform(e.text)
            out.append(NgramInput(x, np.fromiter(v.keys(), np.int64, len(v)), np.fromiter(v.values(), np.float32, len(v))))
        return out

    def _feeds(self, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
        """The head graph's data inputs for a batch (n-grams padded with bucket 0, value 0)."""
        if self.ngrams is None:
            return {HEAD_INPUT: np.ascontiguousarray(np.stack(inputs), dtype=np.float32)}
        n, width = len(inputs), max(1, max(len(x.ids) for x in inputs))
        ids = np.zeros((n, width), dtype=np.int64)
        vals = np.zeros((n, width), dtype=np.float32)
        for r, x in enumerate(inputs):
            ids[r, : len(x.ids)] = x.ids
            vals[r, : len(x.vals)] = x.vals
        emb = np.ascontiguousarray(np.stack([x.embedding for x in inputs]), dtype=np.float32)
        return {HEAD_INPUT: emb, NGRAM_IDS: ids, NGRAM_VALS: vals}

    # -- the head ----------------------------------------------------------------------------

    def head_bytes(self) -> bytes:
        return head_model(self.W, self.b, self.Wn).SerializeToString()

    def _head_session(self) -> ort.InferenceSession:
        opts = session_options(1)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # a few nodes: nothing to gain
        if self.Wn is not None:  # weights fed on every run: one session for the tier's life
            if self._session is None:
                model = head_model(self.W, self.b, self.Wn, weights_as_inputs=True).SerializeToString()
                self._session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
            return self._session
        if self._session is None or self._session_version != self.version:
            self._session = ort.InferenceSession(self.head_bytes(), sess_options=opts, providers=["CPUExecutionProvider"])
            self._session_version = self.version
        return self._session

    def predict_proba(self, inputs: Sequence[np.ndarray]) -> np.ndarray:
        n, k = len(inputs), len(self.labels)
        if n == 0:
            return np.zeros((0, k))
        if self.version == 0:
            return np.full((n, k), 1.0 / k)
        feeds = self._feeds(inputs)
        if self.Wn is not None:
            feeds.update(W=self.W, b=self.b, Wn=self.Wn)
        (probs,) = self._head_session().run([HEAD_OUTPUT], feeds)
        return probs.astype(np.float64)

    def numpy_proba(self, inputs: Sequence[Any]) -> np.ndarray:
        """The head's math in numpy (what learning uses); equals the ONNX graph's output."""
        if self.Wn is None:
            z = np.stack(inputs).astype(np.float32) @ self.W + self.b
        else:
            z = np.stack([x.embedding for x in inputs]).astype(np.float32) @ self.W + self.b
            for r, x in enumerate(inputs):
                z[r] += x.vals @ self.Wn[x.ids]
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def _learn(self, inputs: Sequence[Any], labels: Sequence[str]) -> None:
        rows = [(x, self.index[y]) for x, y in zip(inputs, labels)]
        lr, l2, m = self.config.head_learning_rate, self.config.l2, self.config.head_batch_size
        for start in range(0, len(rows), m):
            chunk = rows[start : start + m]
            y = np.zeros((len(chunk), len(self.labels)), dtype=np.float32)
            y[np.arange(len(chunk)), [c[1] for c in chunk]] = 1.0
            err = (self.numpy_proba([c[0] for c in chunk]) - y) / len(chunk)
            if self.Wn is not None:
                ngram_inputs: list[NgramInput] = [c[0] for c in chunk]
                self._learn_ngrams(ngram_inputs, err)
                x = np.stack([i.embedding for i in ngram_inputs]).astype(np.float32)
            else:
                x = np.stack([c[0] for c in chunk]).astype(np.float32)
            g_w = x.T @ err
            if l2:
                g_w += l2 * self.W
            g_b = err.sum(axis=0)
            self.G_W += g_w * g_w
            self.G_b += g_b * g_b
            self.W -= lr * g_w / (np.sqrt(self.G_W) + _EPS)
            self.b -= lr * g_b / (np.sqrt(self.G_b) + _EPS)

    def _learn_ngrams(self, inputs: Sequence[NgramInput], err: np.ndarray) -> None:
        """AdaGrad on the rows of the n-gram table the chunk touches (sparse)."""
        assert self.Wn is not None and self.G_Wn is not None
        ids = np.concatenate([x.ids for x in inputs])
        if not len(ids):
            return
        vals = np.concatenate([x.vals for x in inputs])
        owner = np.repeat(np.arange(len(inputs)), [len(x.ids) for x in inputs])
        rows, inverse = np.unique(ids, return_inverse=True)
        grad = np.zeros((len(rows), self.Wn.shape[1]), dtype=np.float32)
        np.add.at(grad, inverse, vals[:, None] * err[owner])
        self.G_Wn[rows] += grad * grad
        self.Wn[rows] -= self.config.head_ngram_learning_rate * grad / (np.sqrt(self.G_Wn[rows]) + _EPS)

    # -- snapshots ---------------------------------------------------------------------------

    def _state(self) -> Any:
        # Arrays, not the ONNX graph: restoring never parses protobuf (whose tensors may name
        # external files to read) from the registry, and the tier builds its graph itself.
        state = {"encoder": self.encoder.fingerprint, "W": self.W, "b": self.b, "G_W": self.G_W, "G_b": self.G_b}
        if self.Wn is not None and self.G_Wn is not None:
            state.update(Wn=self.Wn, G_Wn=self.G_Wn)
        return state

    def _load_state(self, state: Any) -> None:
        encoder = field(state, "encoder", str)
        if encoder != self.encoder.fingerprint:
            raise SnapshotError(f"snapshot of a head over {encoder} cannot serve {self.encoder.fingerprint}")
        if ("Wn" in state) != (self.Wn is not None):
            raise SnapshotError(f"snapshot head {'has' if 'Wn' in state else 'lacks'} an n-gram table; this tier's "
                                f"head_ngrams={self.config.head_ngrams}")
        arrays = {name: array(state, name, "f", getattr(self, name).shape).astype(np.float32)
                  for name in ("W", "b", "G_W", "G_b", *(("Wn", "G_Wn") if self.Wn is not None else ()))}
        for name, value in arrays.items():
            setattr(self, name, value)
        self._session = None
