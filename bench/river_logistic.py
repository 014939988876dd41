"""The ``logistic`` tier as it was before it learned in numpy: river's SoftmaxRegression over hashed
n-grams. A baseline for the benchmarks only (bench/cheap_tiers.py, bench/smoke.py,
bench/cascade_sweep.py report the numpy tier against it in the same run) and the source of the
river-format snapshots that ``cascade.tiers.logistic.LogisticTier`` converts on load. Its kind is
still ``logistic``: its snapshots are the ones earlier versions published.

``register()`` makes it the tier kind ``river-logistic`` (config as ``logistic``'s) for benchmarks
that build tiers from a config (bench/worker_throughput.py, bench/smoke.py); the cascade never
registers it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, cast

import numpy as np
from river import linear_model, optim
from scipy import sparse

from cascade.config import FeatureConfig, LogisticTierConfig
from cascade.features import HashedNgrams, SparseRows, SparseVector
from cascade.messages import Event
from cascade.river_state import softmax_from_state, softmax_state
from cascade.tiers.base import SnapshotError, Tier
from cascade.tiers.registry import register_tier, tier_kinds

_BIAS = -1  # a bucket no hash produces: river's softmax regression has no intercept of its own
# Batches this large are featurised in numpy and may be scored with a compiled numpy copy of the
# weights (CompiledWeights): 1 µs an event instead of river's 20-50 µs, but copying the model costs
# as much as scoring about a thousand events with river (ISEAR, 7.7k demonstrations: 54 ms vs 53
# µs), and every demonstration learned makes the copy stale. So a copy is made only once the
# events of such batches scored with river at the current version would have paid for it (the
# ski-rental rule: never more than twice the cheaper of the two). One-event batches (in-process
# learning after every demonstration) never compile; below this size a compiled copy gains little.
_COMPILE_FROM = 32
# Copying one weight costs about 1/300 of scoring one event with river (85-120 ns vs 20-50 µs).
_WEIGHTS_PER_EVENT = 300


class CompiledWeights:
    """A read-only copy of a river softmax regression for batch scoring: a sparse (events × buckets)
    matrix times a dense (rows × labels) weight matrix, with a dense bucket → row table."""

    def __init__(self, model: linear_model.SoftmaxRegression, labels: Sequence[str], n_features: int, version: int) -> None:
        self.version = version
        buckets, cols, values = [], [], []
        for j, label in enumerate(labels):
            w: dict[int, float] = model.weights.get(label, {})
            buckets.append(np.fromiter(w.keys(), dtype=np.int64, count=len(w)))
            values.append(np.fromiter(w.values(), dtype=np.float64, count=len(w)))
            cols.append(np.full(len(w), j))
        unique, row = np.unique(np.concatenate(buckets), return_inverse=True)
        self.W = np.zeros((len(unique) + 1, len(labels)))  # row 0: zeros, for buckets never learned
        self.W[row + 1, np.concatenate(cols)] = np.concatenate(values)
        # Index n_features is the bias bucket (-1 indexes the last entry); 4 bytes a bucket.
        self.row_of = np.zeros(n_features + 1, dtype=np.int32)
        self.row_of[unique] = np.arange(1, len(unique) + 1, dtype=np.int32)
        # river's softmax runs over the labels it has seen only; the others get probability 0.
        self.unseen = np.array([label not in model.weights for label in labels])

    def predict_proba(self, inputs: Sequence[SparseVector]) -> np.ndarray:
        rows = SparseRows.from_dicts(inputs)
        x = sparse.csr_matrix((rows.values, self.row_of[rows.buckets], rows.indptr), shape=(len(rows), len(self.W)))
        logits = np.asarray(x @ self.W)
        logits[:, self.unseen] = -np.inf
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)


class RiverLogisticTier(Tier):
    kind = "logistic"

    def __init__(self, config: LogisticTierConfig, labels: Sequence[str], features: FeatureConfig) -> None:
        super().__init__(config.name, labels, config.cost)
        self.config = config
        self.featurizer = HashedNgrams(features)
        optimizer = optim.AdaGrad if config.optimizer == "adagrad" else optim.SGD
        self.model = linear_model.SoftmaxRegression(optimizer=optimizer(config.learning_rate), l2=config.l2)
        self._compiled: CompiledWeights | None = None
        self._last_version = -1  # the version the events counted in _scored were scored at
        self._scored = 0  # events of large batches scored with river at _last_version

    def prepare(self, events: Sequence[Event]) -> Sequence[SparseVector]:
        if len(events) >= _COMPILE_FROM:
            # SparseRows reads as a sequence of dicts (len, [i]) where river needs one.
            return cast(Sequence[SparseVector], self.featurizer.transform_batch([e.text for e in events]).with_constant(_BIAS))
        out = []
        for e in events:
            x = self.featurizer.transform(e.text)
            x[_BIAS] = 1.0
            out.append(x)
        return out

    def predict_proba(self, inputs: Sequence[SparseVector]) -> np.ndarray:
        probs = np.full((len(inputs), len(self.labels)), 1.0 / len(self.labels))
        if not self.model.weights:
            return probs
        if self._compiled is None or self._compiled.version != self.version:
            if len(inputs) < _COMPILE_FROM:
                return self._river_proba(inputs, probs)
            if self._last_version != self.version:
                self._last_version, self._scored = self.version, 0
            self._scored += len(inputs)
            if self._scored * _WEIGHTS_PER_EVENT < sum(len(w) for w in self.model.weights.values()):
                return self._river_proba(inputs, probs)
            self._compiled = CompiledWeights(self.model, self.labels, self.featurizer.config.n_features, self.version)
        return self._compiled.predict_proba(inputs)

    def _river_proba(self, inputs: Sequence[SparseVector], probs: np.ndarray) -> np.ndarray:
        index = {label: j for j, label in enumerate(self.labels)}
        for i, x in enumerate(inputs):
            row = probs[i]
            row[:] = 0.0
            for label, p in self.model.predict_proba_one(x).items():
                row[index[label]] = p
        return probs

    def _learn(self, inputs: Sequence[SparseVector], labels: Sequence[str]) -> None:
        for x, y in zip(inputs, labels):
            self.model.learn_one(x, y)

    def _state(self) -> Any:
        return softmax_state(self.model)

    def _load_state(self, state: Any) -> None:
        model = softmax_from_state(state)
        n_features = self.featurizer.config.n_features
        for label, weights in model.weights.items():
            # Both would fail only later, in predict_proba: an unknown label, a bucket past the table.
            if label not in self.labels:
                raise SnapshotError(f"snapshot model has weights for {label!r}, not a label of the task")
            if weights and not (_BIAS <= min(weights) and max(weights) < n_features):
                raise SnapshotError(f"snapshot model has buckets outside [{_BIAS}, {n_features})")
        self.model = model
        self._compiled = None  # the version may not change on a rollback
        self._last_version = -1


class RiverLogisticTierConfig(LogisticTierConfig):
    """Kind "river-logistic": ``logistic``'s fields, served by river's path (benchmarks only)."""

    kind: Literal["river-logistic"] = "river-logistic"  # type: ignore[assignment]


def register() -> None:
    """Register the kind ``river-logistic`` (once per process)."""
    if "river-logistic" not in tier_kinds():
        register_tier("river-logistic", RiverLogisticTierConfig,
                      lambda config, labels, features: RiverLogisticTier(config, labels, features))
