"""Which cheap answers are audited: also asked of the LLM, to measure the tier's agreement.

The draw is ``u(event_id) < rate`` with ``u`` a keyed BLAKE2b hash of the event id mapped to
[0, 1). It depends on nothing the policy sees (features, p_agree, risk, the threshold), so the
audited answers are a uniform random sample of a tier's answers and their mean is an unbiased
estimate of the tier's agreement, however the policy chooses what to answer. Being a function of
(event id, salt) it needs no coordination: replicas draw alike and a redelivered event draws
what it drew before (an audit is neither lost nor doubled by a retry).

The salt keeps the draw independent of any other hash of the event id in the system (e.g. a
partitioner or a sampling rule that also hashes the id); change it to draw a fresh sample.
The rate must not change with the policy's confidence, or the sample is no longer uniform.

API::

    sampler = AuditSampler(rate=0.03, salt="contract-audit")
    sampler.draw("event-123") -> bool
    sampler.draw_batch(["e1", "e2", ...]) -> np.ndarray[bool]
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_SCALE = float(2**64)


class AuditSampler:
    def __init__(self, rate: float = 0.03, salt: str = "contract-audit") -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be in [0, 1]")
        self.rate = rate
        self._key = hashlib.blake2b(salt.encode(), digest_size=32).digest()  # fixed-length key from any salt
        self._cut = int(rate * _SCALE)  # compare integers: no float rounding at the edge

    def uniform(self, event_id: str) -> float:
        """The event's draw in [0, 1); audited when below ``rate``."""
        return self._hash(event_id) / _SCALE

    def _hash(self, event_id: str) -> int:
        digest = hashlib.blake2b(event_id.encode(), digest_size=8, key=self._key).digest()
        return int.from_bytes(digest, "big")

    def draw(self, event_id: str) -> bool:
        return self._hash(event_id) < self._cut

    def draw_batch(self, event_ids: Sequence[str]) -> np.ndarray:
        return np.fromiter((self._hash(e) < self._cut for e in event_ids), dtype=bool, count=len(event_ids))
