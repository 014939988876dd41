"""The shared numpy base of the hashed-n-gram softmax tiers (``logistic`` and ``nblr``).

An event is a sparse row of the featurizer's hashed bucket ids (``cascade/features.py``); the
model is a dense (buckets × labels) weight table plus a bias per label, learned online one
demonstration at a time (AdaGrad, or SGD) on the cross-entropy of the LLM's label. A prediction
or an update gathers and scatters only the rows of the buckets its events hold, so one event
costs a few numpy calls over some dozens of rows, where river's per-event path walks Python dicts
(ISEAR: 1,590 → 5,128 events/s, issue 18).

Subclasses change what a class sees of an entry (``_scaled``: the NB log-count ratios of
``nblr``) and what else a step updates (``_after_step``: the NB counts), and add to the snapshot
state (``_extra_state``, and ``_load_state``).

``seen_only`` reproduces river's ``SoftmaxRegression`` exactly, for the ``logistic`` tier that
replaced it: the softmax runs over the labels learned so far (the others get probability 0, and
before any demonstration every label gets 1/k), a step updates the seen labels and the new one,
and probabilities are clamped to [1e-15, 1 - 1e-15] in the gradient, as river's CrossEntropy does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, cast

import numpy as np

from cascade.config import FeatureConfig
from cascade.features import HashedNgrams, SparseRows, SparseVector
from cascade.messages import Event
from cascade.snapshots import SnapshotError, array, field
from cascade.tiers.base import Tier

# Batches this large are featurised in numpy (HashedNgrams.transform_batch); smaller ones, and the
# in-process one event at a time, in plain Python, which is faster there.
_BATCH_FEATURES_FROM = 32
_EPS = 1e-8  # AdaGrad's, as river's
_CLAMP = 1e-15  # river's clamp_proba

Optimizer = Literal["adagrad", "sgd"]


class HashedSoftmaxTier(Tier):
    """Softmax regression over hashed word n-grams in numpy (see the module's docstring).

    Args:
        name, labels, cost: as every tier's.
        features: the hashed n-gram features (``n_features`` rows in each table).
        learning_rate: the optimizer's step.
        optimizer: "adagrad" (per-feature steps, the default) or "sgd".
        l2: L2 penalty added to the gradient of every weight an event touches (river's ``l2``).
        dtype: of the tables. float32 halves them (2^20 buckets × 7 labels: 29 MB each); float64
            keeps the logistic tier's sums as river's, to the last digits.
        seen_only: river's label semantics (see the module's docstring).
    """

    def __init__(
        self,
        name: str,
        labels: Sequence[str],
        cost: float,
        features: FeatureConfig,
        *,
        learning_rate: float,
        optimizer: Optimizer = "adagrad",
        l2: float = 0.0,
        dtype: type[np.floating[Any]] = np.float32,
        seen_only: bool = False,
    ) -> None:
        super().__init__(name, labels, cost)
        if learning_rate <= 0 or l2 < 0:
            raise ValueError("learning_rate must be positive and l2 non-negative")
        self.featurizer = HashedNgrams(features)
        self.learning_rate = learning_rate
        self.optimizer = optimizer
        self.l2 = l2
        self.seen_only = seen_only
        self.index = {label: j for j, label in enumerate(self.labels)}
        n, k = features.n_features, len(self.labels)
        self.W = np.zeros((n, k), dtype=dtype)
        # AdaGrad's sums of squared gradients; SGD keeps none (an empty table).
        self.G = np.zeros((n, k) if optimizer == "adagrad" else (0, k), dtype=dtype)
        # The tables are written at construction (prefault): np.zeros only maps them, and the
        # first write to each (huge) page would otherwise fault inside the stream's first steps,
        # with the kernel compacting memory for huge pages there: ISEAR's first pass scattered
        # its updates 3-5x slower (18 µs instead of 4 per table write). Subclasses prefault theirs.
        prefault(self.W, self.G)
        self.b = np.zeros(k)
        self.G_b = np.zeros(k)
        self.seen = np.zeros(k, dtype=bool)  # labels learned so far (read only with seen_only)
        self._all_seen = False  # seen.all(), which once true stays so: then no masking is needed
        self._pending: tuple[SparseVector, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    # -- hooks -------------------------------------------------------------------------------
    def _scaled(self, buckets: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Each entry's value as each class sees it: (entries × labels), or (entries × 1) for all alike."""
        return values[:, None]

    def _after_step(self, rows: np.ndarray, c: int) -> None:
        """What else one demonstration of class c over ``rows`` updates (after the weights)."""

    def _touched(self) -> np.ndarray:
        """The buckets some demonstration changed: all others are zero in every table."""
        table = self.G if self.optimizer == "adagrad" else self.W
        return np.flatnonzero(table.any(axis=1))

    def _extra_state(self, rows: np.ndarray) -> dict[str, Any]:
        """A subclass's own tables (of ``rows``) for the snapshot; it restores them by overriding
        ``_load_state``, checking them before calling this class's, which checks before changing."""
        return {}

    # -- inputs ------------------------------------------------------------------------------
    def prepare(self, events: Sequence[Event]) -> Sequence[SparseVector]:
        if len(events) >= _BATCH_FEATURES_FROM:
            # SparseRows reads as a sequence of dicts (len, [i]); scoring reads its arrays.
            return cast(Sequence[SparseVector], self.featurizer.transform_batch([e.text for e in events]))
        return [self.featurizer.transform(e.text) for e in events]

    @staticmethod
    def _csr(inputs: Sequence[SparseVector]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if len(inputs) == 1 and not isinstance(inputs, SparseRows):  # skips from_dicts' batch bookkeeping
            x = inputs[0]
            m = len(x)
            return (
                np.array([0, m]),
                np.fromiter(x.keys(), dtype=np.int64, count=m),
                np.fromiter(x.values(), dtype=np.float64, count=m),
            )
        rows = SparseRows.from_dicts(inputs)
        return rows.indptr, rows.buckets, rows.values

    def _logits_to_proba(self, z: np.ndarray) -> np.ndarray:
        if not self.seen_only or self._all_seen:
            return _softmax(z)
        if not self.seen.any():  # river, untrained: no label to put mass on; uniform
            return np.full(z.shape, 1.0 / len(self.labels))
        z = z.copy()
        z[..., ~self.seen] = -np.inf
        return _softmax(z)

    def _forward(self, rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One event: its scaled features, its weight rows and its probabilities."""
        # np.take: a third of the time of fancy indexing, as gathers of table rows.
        x = self._scaled(rows, values)
        w = np.take(self.W, rows, axis=0)
        return x, w, self._logits_to_proba((x * w).sum(axis=0) + self.b)

    # -- prediction --------------------------------------------------------------------------
    def predict_proba(self, inputs: Sequence[SparseVector]) -> np.ndarray:
        indptr, buckets, values = self._csr(inputs)
        if len(inputs) == 1:
            # In-process, the event just scored is often learned next: its forward pass is kept
            # for that (until the model changes), which halves the cost of learning it.
            x, w, p = self._forward(buckets, values)
            self._pending = (inputs[0], buckets, x, w, p)
            return p[None, :].copy()
        x = self._scaled(buckets, values)
        # Row sums with reduceat over one more, zero, entry (a start must index an entry); an
        # empty row's "sum" is then the next row's first entry, hence the mask.
        terms = np.zeros((len(buckets) + 1, len(self.labels)))
        np.multiply(x, np.take(self.W, buckets, axis=0), out=terms[:-1])
        z = np.add.reduceat(terms, indptr[:-1], axis=0)
        z[indptr[:-1] == indptr[1:]] = 0.0
        return self._logits_to_proba(z + self.b)

    # -- learning ----------------------------------------------------------------------------
    def _learn(self, inputs: Sequence[SparseVector], labels: Sequence[str]) -> None:
        unknown = sorted({y for y in labels if y not in self.index})
        if unknown:
            raise ValueError(f"labels {unknown} are not in the tier's label set {self.labels}")
        pending = self._pending
        if len(inputs) == 1 and pending is not None and inputs[0] is pending[0]:
            self._step(*pending[1:], self.index[labels[0]])
            return
        self.learn_many(*self._csr(inputs), [self.index[y] for y in labels])

    def learn_many(self, indptr: np.ndarray, buckets: np.ndarray, values: np.ndarray, classes: Sequence[int]) -> None:
        """Learn CSR rows with class indices, one demonstration at a time, as the stream delivers
        them: each step sees the weights (and counts) the previous ones left."""
        for i, c in enumerate(classes):
            rows = buckets[indptr[i] : indptr[i + 1]]
            self._step(rows, *self._forward(rows, values[indptr[i] : indptr[i + 1]]), c)

    def _step(self, rows: np.ndarray, x: np.ndarray, w: np.ndarray, p: np.ndarray, c: int) -> None:
        """One optimizer step on the cross-entropy of one demonstration of class c."""
        self._pending = None
        if self.seen_only:
            # river: the gradient covers the labels seen so far and c, with clamped probabilities;
            # a label not seen before had none (0), also when none was and p is the uniform one.
            # (np.minimum/np.maximum: np.clip's values without its Python-level dispatch.)
            if self._all_seen:
                err = np.minimum(np.maximum(p, _CLAMP), 1.0 - _CLAMP)
            else:
                p = np.where(self.seen, p, 0.0)
                self.seen[c] = True
                self._all_seen = bool(self.seen.all())
                err = np.where(self.seen, np.minimum(np.maximum(p, _CLAMP), 1.0 - _CLAMP), 0.0)
        else:
            err = p.copy()
        err[c] -= 1.0
        grad = x * err
        grad_b = err
        if self.l2:
            grad = grad + self.l2 * w
            grad_b = grad_b + self.l2 * self.b
        if self.optimizer == "adagrad":
            g2 = np.take(self.G, rows, axis=0) + grad * grad
            self.G[rows] = g2
            self.W[rows] = w - self.learning_rate * grad / np.sqrt(g2 + _EPS)
            self.G_b += grad_b * grad_b
            self.b -= self.learning_rate * grad_b / np.sqrt(self.G_b + _EPS)
        else:
            self.W[rows] = w - self.learning_rate * grad
            self.b -= self.learning_rate * grad_b
        self._after_step(rows, c)

    # -- snapshots ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        rows = self._touched()
        state: dict[str, Any] = {
            "n_features": len(self.W),
            "buckets": rows,
            "weights": self.W[rows],
            "bias": self.b.copy(),
        }
        if self.optimizer == "adagrad":
            state.update(adagrad=self.G[rows], adagrad_bias=self.G_b.copy())
        if self.seen_only:
            state["seen"] = self.seen.copy()
        state.update(self._extra_state(rows))
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        n, k = self.W.shape
        if field(state, "n_features", int) != n:
            raise SnapshotError(f"snapshot of a tier with n_features={state['n_features']} cannot restore one with {n}")
        rows = array(state, "buckets", "iu", (None,)).astype(np.int64)
        if len(rows) and not (0 <= rows.min() and rows.max() < n):
            raise SnapshotError(f"snapshot has buckets outside [0, {n})")
        weights = array(state, "weights", "f", (len(rows), k))
        bias = array(state, "bias", "f", (k,))
        adagrad = adagrad_bias = None
        if self.optimizer == "adagrad":
            adagrad = array(state, "adagrad", "f", (len(rows), k))
            adagrad_bias = array(state, "adagrad_bias", "f", (k,))
        seen = array(state, "seen", "b", (k,)) if self.seen_only else None
        # Everything read and checked: only now is the tier changed.
        self.W.fill(0)
        self.W[rows] = weights
        self.b = bias.astype(np.float64)
        if adagrad is not None and adagrad_bias is not None:
            self.G.fill(0)
            self.G[rows] = adagrad
            self.G_b = adagrad_bias.astype(np.float64)
        if seen is not None:
            self.seen = seen.copy()
            self._all_seen = bool(seen.all())
        self._pending = None


def prefault(*tables: np.ndarray) -> None:
    """Write every page of ``tables`` once, so that later writes never fault (see the constructor)."""
    for table in tables:
        table.fill(0)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
