"""The common interface of the cheap tiers, and their snapshot format."""

from __future__ import annotations

import pickle
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np

from cascade.messages import Event

_MAGIC = b"CSNAP1"


class SnapshotError(ValueError):
    pass


def encode_snapshot(kind: str, version: int, state: Any) -> bytes:
    """Snapshots are pickles with a header; they are only ever read from our own model registry."""
    return _MAGIC + pickle.dumps({"kind": kind, "version": version, "state": state}, protocol=5)


def decode_snapshot(blob: bytes, kind: str) -> tuple[int, Any]:
    if not blob.startswith(_MAGIC):
        raise SnapshotError("not a cascade snapshot")
    body = pickle.loads(blob[len(_MAGIC) :])
    if body.get("kind") != kind:
        raise SnapshotError(f"snapshot of a {body.get('kind')!r} cannot restore a {kind!r}")
    return int(body["version"]), body["state"]


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
    def prepare(self, events: Sequence[Event]) -> list[Any]: ...

    @abstractmethod
    def predict_proba(self, inputs: Sequence[Any]) -> np.ndarray:
        """(len(inputs), len(labels)) probabilities in label order."""

    @abstractmethod
    def _learn(self, inputs: Sequence[Any], labels: Sequence[str]) -> None: ...

    @abstractmethod
    def _state(self) -> Any: ...

    @abstractmethod
    def _load_state(self, state: Any) -> None: ...

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
        if state["labels"] != self.labels:
            raise SnapshotError(f"snapshot labels {state['labels']} differ from the task's {self.labels}")
        self._load_state(state["model"])
        self.version = version
