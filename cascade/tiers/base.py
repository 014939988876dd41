"""The common interface of the cheap tiers (their snapshot format: cascade/snapshots.py)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from cascade.messages import Event
from cascade.snapshots import SnapshotError, decode_snapshot, encode_snapshot, field


class Tier(ABC):
    """A cheap model: class probabilities for a batch, online learning from LLM demonstrations.

    ``prepare`` turns events into the tier's inputs once (hashed features, embeddings), so that
    prediction, the deferral policy and learning all reuse them. ``version`` counts the
    demonstrations learned, so it is monotone and names a model state exactly.
    """

    kind: str = "tier"

    def __init__(self, name: str, labels: Sequence[str], cost: float) -> None:
        self.name = name
        self.labels = list(labels)
        self.cost = cost
        self.version = 0

    @abstractmethod
    def prepare(self, events: Sequence[Event]) -> Sequence[Any]: ...

    @abstractmethod
    def predict_proba(self, inputs: Sequence[Any]) -> np.ndarray:
        """(len(inputs), len(labels)) probabilities in label order."""

    @abstractmethod
    def _learn(self, inputs: Sequence[Any], labels: Sequence[str]) -> None: ...

    @abstractmethod
    def _state(self) -> Any:
        """The model as snapshot data (cascade/snapshots.py): enough to go on learning."""

    @abstractmethod
    def _load_state(self, state: Any) -> None:
        """Take ``_state``'s tree; on anything unfit raise SnapshotError having changed nothing."""

    def extra_features(self, inputs: Sequence[Any], probs: np.ndarray) -> np.ndarray | None:
        """Optional (len(inputs), m) policy features beyond the confidence features of ``probs``
        (``probs`` is ``predict_proba(inputs)``); None, the default, for none."""
        return None

    def learn(self, inputs: Sequence[Any], labels: Sequence[str]) -> None:
        if len(inputs) != len(labels):
            raise ValueError("inputs and labels differ in length")
        unknown = set(labels).difference(self.labels)
        if unknown:  # refused, not skipped: version must count exactly the demonstrations learned
            raise ValueError(f"labels {sorted(unknown)} are not in the tier's label set {self.labels}")
        self._learn(inputs, labels)
        self.version += len(labels)

    def snapshot(self) -> bytes:
        return encode_snapshot(self.kind, self.version, {"labels": self.labels, "model": self._state()})

    def restore(self, blob: bytes) -> None:
        version, state = decode_snapshot(blob, self.kind)
        labels = field(state, "labels", list)
        # str first: == against a list holding an array raises ValueError, not SnapshotError.
        if not all(isinstance(label, str) for label in labels) or labels != self.labels:
            raise SnapshotError(f"snapshot labels {labels} differ from the task's {self.labels}")
        self._load_state(field(state, "model", dict))
        self.version = version
