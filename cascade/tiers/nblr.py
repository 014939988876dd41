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
(buckets × labels) tables; a prediction or an update gathers and scatters only the rows of the
buckets its events hold. The softmax head, its learning and its snapshot are the shared numpy base
of the hashed-n-gram tiers (``cascade/tiers/hashed_softmax.py``); this class adds the counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cascade.config import FeatureConfig
from cascade.snapshots import SnapshotError, array, field
from cascade.tiers.hashed_softmax import HashedSoftmaxTier, prefault


class NblrTier(HashedSoftmaxTier):
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
        if alpha <= 0:
            raise ValueError("alpha must be positive")
        super().__init__(name, labels, cost, features, learning_rate=learning_rate)
        self.alpha = alpha
        self.nb_scaling = nb_scaling
        n, k = features.n_features, len(self.labels)
        self.counts = np.zeros((n, k) if nb_scaling else (0, k), dtype=np.int32)  # demonstrations of class c holding bucket j
        self.class_totals = np.zeros(k)  # Σ_j counts[j, c]
        self.log_ratio = np.zeros_like(self.counts, dtype=np.float32)  # r_cj without its class's norm
        prefault(self.counts, self.log_ratio)
        self.vocabulary = 0  # buckets with a count
        self._norm = np.zeros(k)

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

    def _after_step(self, rows: np.ndarray, c: int) -> None:
        """The counts grow after the step, which saw the ratios from before this demonstration."""
        if not self.nb_scaling:
            return
        self.vocabulary += len(rows) - int(np.count_nonzero(np.take(self.counts, rows, axis=0).any(axis=1)))
        self.counts[rows, c] += 1  # a row's buckets are distinct: no repeated index
        self.class_totals[c] += len(rows)
        self._refresh_ratios(rows)
        self._update_norm()

    # -- snapshots ---------------------------------------------------------------------------
    def _touched(self) -> np.ndarray:
        """The buckets some demonstration held: all others are zero in every table."""
        return np.flatnonzero(self.counts.any(axis=1)) if self.nb_scaling else super()._touched()

    def _extra_state(self, rows: np.ndarray) -> dict[str, Any]:
        state: dict[str, Any] = {"nb_scaling": self.nb_scaling}
        if self.nb_scaling:
            state["counts"] = self.counts[rows]
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        if field(state, "nb_scaling", bool) != self.nb_scaling:
            raise SnapshotError(
                f"snapshot of a tier with nb_scaling={state['nb_scaling']} cannot restore one with "
                f"nb_scaling={self.nb_scaling}"
            )
        counts = None
        if self.nb_scaling:
            counts = array(state, "counts", "iu", (len(field(state, "buckets", np.ndarray)), len(self.labels)))
            if (counts < 0).any():
                raise SnapshotError("snapshot has negative counts")
        super()._load_state(state)  # checks the rest, then sets the head
        if counts is not None:
            rows = np.asarray(state["buckets"], dtype=np.int64)
            self.counts.fill(0)
            self.log_ratio.fill(0)
            self.counts[rows] = counts
            self.class_totals = self.counts[rows].sum(axis=0, dtype=np.float64)
            self.vocabulary = len(rows)
            self._refresh_ratios(rows)
            self._update_norm()
