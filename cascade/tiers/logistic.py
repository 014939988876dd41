"""Tier 1: multiclass online logistic (softmax) regression with river over hashed n-grams."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from river import linear_model, optim

from cascade.config import FeatureConfig, TierConfig
from cascade.features import HashedNgrams, SparseVector
from cascade.messages import Event
from cascade.tiers.base import Tier

_BIAS = -1  # a bucket no hash produces: river's softmax regression has no intercept of its own


class LogisticTier(Tier):
    kind = "logistic"

    def __init__(self, config: TierConfig, labels: Sequence[str], features: FeatureConfig) -> None:
        super().__init__(config.name, labels, config.cost)
        self.config = config
        self.featurizer = HashedNgrams(features)
        optimizer = optim.AdaGrad if config.optimizer == "adagrad" else optim.SGD
        self.model = linear_model.SoftmaxRegression(optimizer=optimizer(config.learning_rate), l2=config.l2)

    def prepare(self, events: Sequence[Event]) -> list[SparseVector]:
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
        return self.model

    def _load_state(self, state: Any) -> None:
        self.model = state
