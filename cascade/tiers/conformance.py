"""``check_tier``: what every cheap tier must do for the cascade, checked on a small stream.

In the spirit of river's ``check_estimator``: run it on a tier kind of one's own (or in a test
over every registered kind) before putting the tier in a cascade.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cascade.messages import Event
from cascade.tiers.base import SnapshotError, Tier

# The logistic tier featurises and scores batches of 32 or more differently (numpy, compiled
# weights), so the stream must hold two such batches: one to learn, one to predict.
MIN_EVENTS = 64
NOT_A_LABEL = "\x00not-a-label"


def check_tier(
    make: Callable[[Sequence[str]], Tier], events: Sequence[Event], answers: Sequence[str], atol: float = 1e-9
) -> None:
    """Raise AssertionError naming the first check the tier fails.

    ``make(labels)`` builds a fresh tier over the label set ``labels``; ``answers[i]`` is the
    LLM's label for ``events[i]`` (at least two labels, at least ``MIN_EVENTS`` events). The
    label set is the answers' labels in order of first appearance. ``atol`` bounds the
    differences allowed between batch and one-at-a-time probabilities and across a snapshot.
    """
    if len(events) != len(answers) or len(events) < MIN_EVENTS:
        raise ValueError(f"check_tier needs at least {MIN_EVENTS} events, each with an answer")
    labels = list(dict.fromkeys(answers))
    if len(labels) < 2:
        raise ValueError("check_tier needs answers of at least two labels")
    half = len(events) // 2
    tier = make(labels)
    name = f"tier {tier.name!r} (kind {tier.kind!r})"
    _check(tier.labels == labels, f"{name} has labels {tier.labels}, built over {labels}")
    _check_probabilities(name, tier, tier.predict_proba(tier.prepare(events)), len(events), "untrained")

    before = tier.version
    tier.learn(tier.prepare(events[:half]), answers[:half])
    _check(tier.version == before + half, f"{name}: learning {half} demonstrations took version "
                                          f"{before} to {tier.version}, not {before + half}")
    _check_refuses_unknown_labels(name, tier, events)
    _check_batches_equal_single_events(name, tier, events, atol)
    _check_snapshot_round_trip(name, tier, make, events, answers, half, atol)
    _check_label_order(name, make, events, labels)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def _check_probabilities(name: str, tier: Tier, probs: np.ndarray, n: int, when: str) -> None:
    shape = (n, len(tier.labels))
    _check(probs.shape == shape, f"{name} ({when}): predict_proba gave shape {probs.shape}, not {shape}")
    _check(bool(np.isfinite(probs).all() and (probs >= 0).all()),
           f"{name} ({when}): probabilities not finite and non-negative")
    # float32 tiers (ONNX) sum to 1 within float32's resolution.
    _check(np.allclose(probs.sum(axis=1), 1.0, atol=1e-5), f"{name} ({when}): probability rows do not sum to 1")


def _check_refuses_unknown_labels(name: str, tier: Tier, events: Sequence[Event]) -> None:
    inputs = tier.prepare(events[:2])
    version, probs = tier.version, tier.predict_proba(inputs)
    try:
        tier.learn(inputs, [tier.labels[0], NOT_A_LABEL])
    except ValueError:
        pass
    else:
        raise AssertionError(f"{name} learned a label outside its label set instead of raising ValueError")
    _check(tier.version == version and np.array_equal(tier.predict_proba(inputs), probs),
           f"{name}: a refused batch of demonstrations changed the tier")


def _check_batches_equal_single_events(name: str, tier: Tier, events: Sequence[Event], atol: float) -> None:
    batch = tier.predict_proba(tier.prepare(events))
    _check_probabilities(name, tier, batch, len(events), "trained")
    again = tier.predict_proba(tier.prepare(events))  # a tier may switch to a faster path once warm
    single = np.vstack([tier.predict_proba(tier.prepare([e])) for e in events])
    worst = float(max(np.abs(batch - single).max(), np.abs(again - single).max()))
    _check(worst <= atol, f"{name}: batch probabilities differ from one event at a time by {worst:.3g} > {atol:g}")


def _check_snapshot_round_trip(
    name: str, tier: Tier, make: Callable[[Sequence[str]], Tier], events: Sequence[Event],
    answers: Sequence[str], half: int, atol: float,
) -> None:
    fresh = make(tier.labels)
    fresh.restore(tier.snapshot())
    _check(fresh.version == tier.version, f"{name}: restored version {fresh.version}, snapshot of {tier.version}")
    _check_same(name, "restored from a snapshot", tier, fresh, events, atol)
    # A learner restores a snapshot and goes on learning: the optimiser's state must travel too.
    for t in (tier, fresh):
        t.learn(t.prepare(events[half:]), answers[half:])
    _check_same(name, "restored, then taught the same demonstrations", tier, fresh, events, atol)
    for other in (list(reversed(tier.labels)), tier.labels[:-1]):
        try:
            make(other).restore(tier.snapshot())
        except SnapshotError:
            continue
        raise AssertionError(f"{name}: a tier over {other} restored a snapshot over {tier.labels}")


def _check_same(name: str, what: str, tier: Tier, other: Tier, events: Sequence[Event], atol: float) -> None:
    worst = float(np.abs(tier.predict_proba(tier.prepare(events)) - other.predict_proba(other.prepare(events))).max())
    _check(worst <= atol, f"{name} {what} predicts differently by {worst:.3g} > {atol:g}")


def _check_label_order(name: str, make: Callable[[Sequence[str]], Tier], events: Sequence[Event],
                       labels: list[str]) -> None:
    """A tier taught a single label puts most probability in that label's column."""
    for j in (0, len(labels) - 1):
        tier = make(labels)
        inputs = tier.prepare(events)
        tier.learn(inputs, [labels[j]] * len(events))
        top = int(tier.predict_proba(inputs).mean(axis=0).argmax())
        _check(top == j, f"{name} taught only {labels[j]!r} favours column {top} ({labels[top]!r}), "
                         f"not {j}: columns are not in the tier's label order")
