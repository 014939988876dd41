"""Tier kind ``nblr``: NB-weighted online logistic regression (NBSVM-style) over hashed n-grams, in numpy.

Class c reads every n-gram feature x_j scaled by its naive-Bayes log-count ratio against the other
classes, r_cj = log((p_cj / |p_c|_1) / (q_cj / |q_c|_1)), where p_c counts the demonstrations of
class c that contain bucket j and q_c those of the other classes, both plus ``alpha`` (Laplace) in
every bucket of the hash space. Its logit is b_c + Σ_j x_j r_cj w_cj; a softmax head over those
logits learns online (one demonstration at a time, AdaGrad), and the counts grow after each step.
The ratios say at once which n-grams tell a class apart, so the head needs fewer demonstrations to
become confident (Wang & Manning, 2012). With ``nb_scaling=False`` the tier is plain softmax
regression over the same features, as the river-based ``logistic`` tier learns it, in numpy.

Weights, AdaGrad's squared-gradient sums, the counts and their log-ratios are dense
(buckets × labels) tables; a
prediction or an update gathers and scatters only the rows of the buckets its events hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from cascade.config import FeatureConfig
from cascade.features import HashedNgrams, SparseRows, SparseVector
from cascade.messages import Event
from cascade.tiers.base import Tier

# Batches this large are featurised in numpy (HashedNgrams.transform_batch); smaller ones, and the
# in-process one event at a time, in plain Python, which is faster there.
_BATCH_FEATURES_FROM = 32
_EPS = 1e-8  # AdaGrad's, as river's


class NblrTier(Tier):
    """NB-weighted softmax regression over hashed word n-grams (see the module's docstring).

    Args:
        name, labels, cost: as every tier's.
        features: the hashed n-gram features (``n_features`` rows in each table).
        learning_rate: AdaGrad's step. The scaled features are larger than plain ones (|r| is
            often 1-3), so the step is half the logistic tier's 1.0: at 1.0, hatespeech/Llama-2
            agreed less with the LLM (0.805 against 0.816), for ISEAR/GPT-3.5's 0.631 against 0.628.
        alpha: Laplace smoothing of the naive-Bayes counts.
        nb_scaling: False for plain softmax regression (no count table is kept then).
    """

    kind = "nblr"

    def __init__(
        self,
        name: str,
        labels: Sequence[str],
        cost: float,
        features: FeatureConfig,
        *,
        learning_rate: float = 0.5,
        alpha: float = 1.0,
        nb_scaling: bool = True,
    ) -> None:
        super().__init__(name, labels, cost)
        if learning_rate <= 0 or alpha <= 0:
            raise ValueError("learning_rate and alpha must be positive")
        self.featurizer = HashedNgrams(features)
        self.learning_rate = learning_rate
        self.alpha = alpha
        self.nb_scaling = nb_scaling
        self.index = {label: j for j, label in enumerate(self.labels)}
        n, k = features.n_features, len(self.labels)
        # float32 halves the tables (2^20 buckets × 7 labels: 29 MB each); sums run in float64.
        self.W = np.zeros((n, k), dtype=np.float32)
        self.G = np.zeros((n, k), dtype=np.float32)  # AdaGrad's sums of squared gradients
        self.b = np.zeros(k)
        self.G_b = np.zeros(k)
        self.counts = np.zeros((n, k) if nb_scaling else (0, k), dtype=np.int32)  # demonstrations of class c holding bucket j
        self.class_totals = np.zeros(k)  # Σ_j counts[j, c]
        self.log_ratio = np.zeros_like(self.counts, dtype=np.float32)  # r_cj without its class's norm
        self.vocabulary = 0  # buckets with a count
        self._norm = np.zeros(k)
        self._pending: tuple[SparseVector, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

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

    def _scaled(self, buckets: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Each entry's value as each class sees it: x_j r_cj (entries × labels), or x_j (entries × 1)."""
        if not self.nb_scaling:
            return values[:, None]
        return values[:, None] * (np.take(self.log_ratio, buckets, axis=0) + self._norm)

    def _refresh_ratios(self, rows: np.ndarray) -> None:
        """log(p_cj/q_cj) of the buckets whose counts changed; the other classes' count of a
        bucket is its total minus c's. Kept in a table so that scoring takes no logarithms."""
        c = np.take(self.counts, rows, axis=0).astype(np.float64)
        self.log_ratio[rows] = np.log((c + self.alpha) / (c.sum(axis=1, keepdims=True) - c + self.alpha))

    def _update_norm(self) -> None:
        """log(|q_c|_1 / |p_c|_1), smoothed over the buckets seen so far (the vocabulary): over the
        whole hash space, alpha's 2^20 pseudo-counts would swamp the real ones for the first
        million n-grams, and the tier agreed less with the LLM (ISEAR 0.615 against 0.628)."""
        if self.vocabulary == 0:
            self._norm = np.zeros(len(self.labels))
            return
        space = self.alpha * self.vocabulary
        self._norm = np.log(space + self.class_totals.sum() - self.class_totals) - np.log(space + self.class_totals)

    def _forward(self, rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One event: its scaled features, its weight rows and its probabilities."""
        # np.take: a third of the time of fancy indexing, as gathers of table rows.
        x = self._scaled(rows, values)
        w = np.take(self.W, rows, axis=0)
        return x, w, _softmax((x * w).sum(axis=0) + self.b)

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
        return _softmax(z + self.b)

    # -- learning ----------------------------------------------------------------------------
    def _learn(self, inputs: Sequence[SparseVector], labels: Sequence[str]) -> None:
        unknown = sorted({y for y in labels if y not in self.index})
        if unknown:
            raise ValueError(f"labels {unknown} are not in the tier's label set {self.labels}")
        pending = self._pending
        if len(inputs) == 1 and pending is not None and inputs[0] is pending[0]:
            self._step(*pending[1:], self.index[labels[0]])
            return
        indptr, buckets, values = self._csr(inputs)
        for i, y in enumerate(labels):
            # One demonstration at a time, as the stream delivers them: each step sees the
            # weights and counts the previous ones left.
            rows = buckets[indptr[i] : indptr[i + 1]]
            self._step(rows, *self._forward(rows, values[indptr[i] : indptr[i + 1]]), self.index[y])

    def _step(self, rows: np.ndarray, x: np.ndarray, w: np.ndarray, p: np.ndarray, c: int) -> None:
        """AdaGrad on the cross-entropy of one demonstration of class c, then its counts."""
        self._pending = None
        err = p.copy()
        err[c] -= 1.0
        grad = x * err
        g2 = np.take(self.G, rows, axis=0) + grad * grad
        self.G[rows] = g2
        self.W[rows] = w - self.learning_rate * grad / np.sqrt(g2 + _EPS)
        self.G_b += err * err
        self.b -= self.learning_rate * err / np.sqrt(self.G_b + _EPS)
        if self.nb_scaling:
            self.vocabulary += len(rows) - int(np.count_nonzero(np.take(self.counts, rows, axis=0).any(axis=1)))
            self.counts[rows, c] += 1  # a row's buckets are distinct: no repeated index
            self.class_totals[c] += len(rows)
            self._refresh_ratios(rows)
            self._update_norm()

    # -- snapshots ---------------------------------------------------------------------------
    def _touched(self) -> np.ndarray:
        """The buckets some demonstration held: all others are zero in every table."""
        table = self.counts if self.nb_scaling else self.G
        return np.flatnonzero(table.any(axis=1))

    def _state(self) -> dict[str, Any]:
        rows = self._touched()
        state: dict[str, Any] = {
            "n_features": len(self.W),
            "nb_scaling": self.nb_scaling,
            "buckets": rows,
            "weights": self.W[rows],
            "adagrad": self.G[rows],
            "bias": self.b.copy(),
            "adagrad_bias": self.G_b.copy(),
        }
        if self.nb_scaling:
            state["counts"] = self.counts[rows]
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        if state["n_features"] != len(self.W) or state["nb_scaling"] != self.nb_scaling:
            raise ValueError(
                f"state of a tier with n_features={state['n_features']}, nb_scaling={state['nb_scaling']} "
                f"cannot restore one with n_features={len(self.W)}, nb_scaling={self.nb_scaling}"
            )
        rows = np.asarray(state["buckets"], dtype=np.int64)
        for table in (self.W, self.G, self.counts, self.log_ratio):
            table.fill(0)
        self.W[rows] = state["weights"]
        self.G[rows] = state["adagrad"]
        self.b = np.array(state["bias"], dtype=np.float64)
        self.G_b = np.array(state["adagrad_bias"], dtype=np.float64)
        if self.nb_scaling:
            self.counts[rows] = state["counts"]
            self.class_totals = self.counts[rows].sum(axis=0, dtype=np.float64)
            self.vocabulary = len(rows)
            self._refresh_ratios(rows)
            self._update_norm()
        self._pending = None


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
