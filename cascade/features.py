"""Hashed bag of word n-grams: the sparse input of the online logistic tier."""

from __future__ import annotations

import math
import re
import zlib

from cascade.config import FeatureConfig

_TOKEN = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?|\d+|[!?]", re.UNICODE)

SparseVector = dict[int, float]
_MAX_REMEMBERED = 500_000
_MIX = 0x9E3779B1  # odd 32-bit multiplier (golden ratio) that spreads a word hash before the next is mixed in


class HashedNgrams:
    """Text → {hash bucket: weight}, L2-normalised binary n-gram presence.

    crc32 rather than ``hash()`` so that buckets are the same in every process
    (workers, learner, replays) regardless of PYTHONHASHSEED.
    """

    def __init__(self, config: FeatureConfig) -> None:
        self.config = config
        self._mask = config.n_features - 1 if config.n_features & (config.n_features - 1) == 0 else None
        self._n = config.n_features
        # Words are Zipf-distributed: remembering their hashes skips most of the hashing.
        self._hashes: dict[str, int] = {}

    def tokens(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower() if self.config.lowercase else text)

    def _hash(self, gram: str) -> int:
        h = self._hashes.get(gram)
        if h is None:
            if len(self._hashes) > _MAX_REMEMBERED:
                self._hashes.clear()
            h = self._hashes[gram] = zlib.crc32(gram.encode("utf-8"))
        return h

    def transform(self, text: str) -> SparseVector:
        words = self.tokens(text)
        hashes = [self._hash(w) for w in words]
        keys = set(hashes)
        # An n-gram's hash is mixed from its words' hashes: no n-gram strings are built or hashed.
        run = hashes
        for _ in range(2, self.config.ngram_max + 1):
            run = [((a * _MIX) ^ b) & 0xFFFFFFFF for a, b in zip(run, hashes[len(hashes) - len(run) + 1 :])]
            keys.update(run)
        if self.config.char_ngrams is not None:
            lo, hi = self.config.char_ngrams
            for w in set(words):
                padded = f"<{w}>"
                keys.update(
                    self._hash("#" + padded[i : i + n]) for n in range(lo, hi + 1) for i in range(len(padded) - n + 1)
                )
        if not keys:
            return {}
        buckets = {k & self._mask for k in keys} if self._mask is not None else {k % self._n for k in keys}
        return dict.fromkeys(buckets, 1.0 / math.sqrt(len(buckets)))
