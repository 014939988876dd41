"""Tier kind ``ensemble``: the mean of its member tiers' probabilities, each member learning on its own.

A typical ensemble pairs tiers that err differently, e.g. ``nblr`` (hashed n-grams) and ``onnx``
(a frozen MiniLM encoder and a softmax head)::

    tiers:
      - name: cheap
        kind: ensemble
        members:
          - {name: nblr, kind: nblr}
          - {name: minilm, kind: onnx}

``prepare`` runs every member's ``prepare`` once and hands back, per event, the tuple of the
members' inputs; ``learn`` teaches every member the same demonstrations. Besides the ensemble's
confidence features, the deferral policy sees how much the members disagree
(``extra_features``): the mean pairwise total variation of their probabilities and whether
their argmax differ, a strong sign of a hard event that the averaged probabilities blur.

The snapshot holds each member's own snapshot (bytes, data only: cascade/snapshots.py), so a
member restores exactly as it would on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import combinations
from typing import Any, overload

import numpy as np

from cascade.messages import Event
from cascade.snapshots import SnapshotError, field
from cascade.tiers.base import Tier

N_EXTRA_FEATURES = 2  # mean pairwise total variation, argmax disagreement


class EnsembleBatch(Sequence[tuple[Any, ...]]):
    """A prepared batch: one input sequence per member (kept whole, so each member scores its own
    batch type), read as a sequence of per-event tuples."""

    def __init__(self, members: Sequence[Sequence[Any]]) -> None:
        self.members = list(members)
        self._n = len(self.members[0]) if self.members else 0

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> tuple[Any, ...]: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[tuple[Any, ...]]: ...

    def __getitem__(self, i: int | slice) -> tuple[Any, ...] | Sequence[tuple[Any, ...]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        return tuple(m[i] for m in self.members)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return (self[i] for i in range(self._n))


class EnsembleTier(Tier):
    """The mean of ``members``' probabilities (see the module's docstring).

    Args:
        name, labels, cost: as every tier's.
        members: the member tiers, each over ``labels`` (at least two).
    """

    kind = "ensemble"

    def __init__(self, name: str, labels: Sequence[str], cost: float, members: Sequence[Tier]) -> None:
        super().__init__(name, labels, cost)
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        for m in members:
            if m.labels != self.labels:
                raise ValueError(f"member {m.name!r} has labels {m.labels}, the ensemble {self.labels}")
        self.members = list(members)
        # The members' probabilities of the last batch scored, for extra_features: (inputs, version, probs).
        self._last: tuple[Sequence[Any], int, list[np.ndarray]] | None = None

    def prepare(self, events: Sequence[Event]) -> Sequence[tuple[Any, ...]]:
        return EnsembleBatch([m.prepare(events) for m in self.members])

    def _member_inputs(self, inputs: Sequence[Any]) -> list[Sequence[Any]]:
        if isinstance(inputs, EnsembleBatch):
            return inputs.members
        # A list of per-event tuples (the in-process learner reassembles batches so).
        for x in inputs:
            if not (isinstance(x, tuple) and len(x) == len(self.members)):
                raise ValueError(f"ensemble {self.name!r} takes tuples of {len(self.members)} member inputs")
        return [[x[j] for x in inputs] for j in range(len(self.members))]

    def member_probs(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """Each member's (len(inputs), len(labels)) probabilities."""
        last = self._last
        if last is not None and last[0] is inputs and last[1] == self.version:
            return last[2]
        probs = [m.predict_proba(x) for m, x in zip(self.members, self._member_inputs(inputs))]
        self._last = (inputs, self.version, probs)
        return probs

    def predict_proba(self, inputs: Sequence[Any]) -> np.ndarray:
        if len(inputs) == 0:
            return np.zeros((0, len(self.labels)))
        probs = self.member_probs(inputs)
        return np.mean(np.stack([p.astype(np.float64) for p in probs]), axis=0)

    def extra_features(self, inputs: Sequence[Any], probs: np.ndarray) -> np.ndarray | None:
        """(n, 2): the members' mean pairwise total variation, and 1.0 where their argmax differ."""
        members = self.member_probs(inputs) if len(inputs) else []
        if not members:
            return np.zeros((0, N_EXTRA_FEATURES))
        pairs = list(combinations(members, 2))
        tv = np.mean([0.5 * np.abs(a.astype(np.float64) - b).sum(axis=1) for a, b in pairs], axis=0)
        tops = np.stack([p.argmax(axis=1) for p in members])
        differ = (tops != tops[0]).any(axis=0).astype(np.float64)
        return np.column_stack([tv, differ])

    def _learn(self, inputs: Sequence[Any], labels: Sequence[str]) -> None:
        self._last = None
        for m, x in zip(self.members, self._member_inputs(inputs)):
            m.learn(x, labels)

    def _state(self) -> Any:
        return {"members": [{"name": m.name, "kind": m.kind, "snapshot": m.snapshot()} for m in self.members]}

    def _load_state(self, state: Any) -> None:
        entries = field(state, "members", list)
        if len(entries) != len(self.members):
            raise SnapshotError(f"snapshot has {len(entries)} members, the ensemble {len(self.members)}")
        blobs = []
        for m, entry in zip(self.members, entries):
            kind, blob = field(entry, "kind", str), field(entry, "snapshot", bytes)
            if kind != m.kind:
                raise SnapshotError(f"snapshot member of kind {kind!r} cannot restore {m.name!r} of kind {m.kind!r}")
            blobs.append(blob)
        saved = [m.snapshot() for m in self.members]  # so a member failing leaves every member as it was
        try:
            for m, blob in zip(self.members, blobs):
                m.restore(blob)
        except SnapshotError:
            for m, blob in zip(self.members, saved):
                m.restore(blob)
            raise
        self._last = None

