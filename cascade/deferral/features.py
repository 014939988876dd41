"""Confidence features of a tier's class probabilities: what the deferral policy sees."""

from __future__ import annotations

import numpy as np


def confidence_features(probs: np.ndarray) -> np.ndarray:
    """(n, K) probabilities → (n, 5 + K): top-1, top-2, margin, normalised entropy, the log-odds
    of top-1 (scaled), one-hot argmax.

    The log-odds spread out the confident end (0.9 vs 0.99), where answering is decided.
    The one-hot lets the policy learn that some predicted classes are less trustworthy than
    others (a rare class the tier has seen little of), which a threshold on top-1 cannot.
    """
    n, k = probs.shape
    top2 = -np.partition(-probs, 1, axis=1)[:, :2] if k > 1 else np.hstack([probs, np.zeros((n, 1))])
    clipped = np.clip(probs, 1e-12, 1.0)
    entropy = -(clipped * np.log(clipped)).sum(axis=1) / np.log(k)
    onehot = np.zeros((n, k))
    onehot[np.arange(n), probs.argmax(axis=1)] = 1.0
    top1 = np.clip(top2[:, 0], 1e-6, 1 - 1e-6)
    log_odds = np.log(top1 / (1 - top1)) / 5.0
    return np.column_stack([top2[:, 0], top2[:, 1], top2[:, 0] - top2[:, 1], entropy, log_odds, onehot])
