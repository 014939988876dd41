"""Hashed bag of word n-grams: the sparse input of the online logistic tier."""

from __future__ import annotations

import math
import re
import zlib

from cascade.config import FeatureConfig

_TOKEN = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?|\d+|[!?]", re.UNICODE)

SparseVector = dict[int, float]


class HashedNgrams:
    """Text → {hash bucket: weight}, L2-normalised binary n-gram presence.

    crc32 rather than ``hash()`` so that buckets are the same in every process
    (workers, learner, replays) regardless of PYTHONHASHSEED.
    """

    def __init__(self, config: FeatureConfig) -> None:
        self.config = config
        self._mask = config.n_features - 1 if config.n_features & (config.n_features - 1) == 0 else None
        self._n = config.n_features

    def tokens(self, text: str) -> list[str]:
        return _TOKEN.findall(text.lower() if self.config.lowercase else text)

    def _bucket(self, gram: str) -> int:
        h = zlib.crc32(gram.encode("utf-8"))
        return h & self._mask if self._mask is not None else h % self._n

    def transform(self, text: str) -> SparseVector:
        words = self.tokens(text)
        grams: set[str] = set(words)
        for n in range(2, self.config.ngram_max + 1):
            grams.update(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
        if self.config.char_ngrams is not None:
            lo, hi = self.config.char_ngrams
            for w in set(words):
                padded = f"<{w}>"
                for n in range(lo, hi + 1):
                    grams.update("#" + padded[i : i + n] for i in range(len(padded) - n + 1))
        if not grams:
            return {}
        weight = 1.0 / math.sqrt(len(grams))
        out: SparseVector = {}
        for g in grams:
            b = self._bucket(g)
            out[b] = out.get(b, 0.0) + weight
        return out
