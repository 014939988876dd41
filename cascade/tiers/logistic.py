"""Tier 1: multiclass online logistic (softmax) regression over hashed n-grams, learned in numpy.

The model is river's ``SoftmaxRegression`` as this tier ran it until issue 18 (AdaGrad or SGD,
optional L2, a bias per label, softmax over the labels learned so far, clamped gradients), learned
and scored by the shared numpy base (``cascade/tiers/hashed_softmax.py``) instead of river's
per-event dicts: the same probabilities up to float rounding (sums run in another order), at
several times the speed (docs/benchmarks.md, issue 18). River's path stays, as a benchmark baseline
only, in bench/river_logistic.py.

Snapshots are the base's data-only tables. A snapshot in river's format (what earlier versions
published: per-label sparse weights and AdaGrad sums, the bias as bucket -1) is converted on load,
so a deployment upgrades without retraining; one learned with another optimizer, learning rate or
L2 than this tier's config is refused with a SnapshotError naming the difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cascade.config import FeatureConfig, LogisticTierConfig
from cascade.snapshots import SnapshotError, array, field, number
from cascade.tiers.hashed_softmax import HashedSoftmaxTier

_RIVER_BIAS = -1  # river's softmax regression has no intercept: the tier gave it this bucket
_RIVER_OPTIMIZERS = {"AdaGrad": "adagrad", "SGD": "sgd"}


class LogisticTier(HashedSoftmaxTier):
    kind = "logistic"

    def __init__(self, config: LogisticTierConfig, labels: Sequence[str], features: FeatureConfig) -> None:
        # float64 tables: the sums are river's to the last digits, so are the decisions.
        super().__init__(
            config.name, labels, config.cost, features, learning_rate=config.learning_rate,
            optimizer=config.optimizer, l2=config.l2, dtype=np.float64, seen_only=True,
        )
        self.config = config

    def _load_state(self, state: dict[str, Any]) -> None:
        if "classes" in state:
            state = self._from_river(state)
        super()._load_state(state)

    def _from_river(self, tree: dict[str, Any]) -> dict[str, Any]:
        """A river-format snapshot (``cascade.river_state.softmax_state``) as this tier's state."""
        self._check_river_optimizer(field(tree, "optimizer", dict), "the prototype")
        if number(tree, "l2") != self.l2:
            raise SnapshotError(f"river snapshot learned with l2={number(tree, 'l2')}, this tier's is {self.l2}")
        n, k = self.W.shape
        classes: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for entry in field(tree, "classes", list):
            label = field(entry, "label", str)
            if label not in self.index:
                raise SnapshotError(f"snapshot model has weights for {label!r}, not a label of the task")
            opt = field(entry, "optimizer", dict)
            self._check_river_optimizer(opt, f"label {label!r}")
            weights = field(entry, "weights", dict)
            keys = array(weights, "keys", "iu", (None,)).astype(np.int64)
            values = array(weights, "values", "f", (len(keys),))
            if self.optimizer == "adagrad":
                g2 = field(opt, "g2", dict)
                g2_keys = array(g2, "keys", "iu", (None,)).astype(np.int64)
                g2_values = array(g2, "values", "f", (len(g2_keys),))
            else:
                g2_keys, g2_values = np.zeros(0, dtype=np.int64), np.zeros(0)
            for b in (keys, g2_keys):
                if len(b) and not (_RIVER_BIAS <= b.min() and b.max() < n):
                    raise SnapshotError(f"snapshot model has buckets outside [{_RIVER_BIAS}, {n})")
            classes.append((self.index[label], keys, values, g2_keys, g2_values))
        W, G = np.zeros((n, k)), np.zeros((n, k))
        bias, g2_bias, seen = np.zeros(k), np.zeros(k), np.zeros(k, dtype=bool)
        for j, keys, values, g2_keys, g2_values in classes:
            seen[j] = True  # river holds weights for exactly the labels it learned
            for table, vector, ks, vs in ((W, bias, keys, values), (G, g2_bias, g2_keys, g2_values)):
                table[ks[ks != _RIVER_BIAS], j] = vs[ks != _RIVER_BIAS]
                vector[j] = vs[ks == _RIVER_BIAS].sum()  # at most one entry
        rows = np.flatnonzero(W.any(axis=1) | G.any(axis=1))
        state: dict[str, Any] = {"n_features": n, "buckets": rows, "weights": W[rows], "bias": bias, "seen": seen}
        if self.optimizer == "adagrad":
            state.update(adagrad=G[rows], adagrad_bias=g2_bias)
        return state

    def _check_river_optimizer(self, opt: dict[str, Any], whose: str) -> None:
        kind = _RIVER_OPTIMIZERS.get(field(opt, "type", str))
        if kind != self.optimizer or number(opt, "lr") != self.learning_rate:
            raise SnapshotError(
                f"river snapshot: {whose} learned with {opt['type']} at lr {opt.get('lr')!r}; this tier is "
                f"{self.optimizer} at lr {self.learning_rate} (retrain, or configure the tier as the snapshot)"
            )
        if kind == "adagrad" and number(opt, "eps") != 1e-8:
            raise SnapshotError(f"river snapshot: {whose} uses AdaGrad eps {opt['eps']}, this tier 1e-8")
