"""Hashed bag of word n-grams: the sparse input of the online logistic tier."""

from __future__ import annotations

import itertools
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from cascade.config import FeatureConfig

_WORD = r"[^\W\d_]+(?:'[^\W\d_]+)?|\d+|[!?]"
# The same tokens on ASCII text, a third faster: most streams are mostly ASCII.
_ASCII_WORD = r"[a-zA-Z]+(?:'[a-zA-Z]+)?|[0-9]+|[!?]"
_TOKEN, _ASCII_TOKEN = re.compile(_WORD), re.compile(_ASCII_WORD)
# A batch is tokenised in one pass over its texts joined by _SEP, which no token contains and
# which lowercasing leaves alone; the pattern returns each _SEP too, marking where a text ends.
_SEP = "\x00"
_BATCH_TOKEN, _ASCII_BATCH_TOKEN = re.compile(f"{_WORD}|{_SEP}"), re.compile(f"{_ASCII_WORD}|{_SEP}")
_UNKNOWN = 1 << 32  # no crc32: a word not remembered yet
_SEP_HASH = 1 << 33

SparseVector = dict[int, float]
_MAX_REMEMBERED = 500_000
_MIX = 0x9E3779B1  # odd 32-bit multiplier (golden ratio) that spreads a word hash before the next is mixed in
_LOW32 = 0xFFFFFFFF


class SparseRows:
    """A batch of sparse rows in CSR form: row i holds ``buckets[indptr[i]:indptr[i+1]]`` with
    ``values`` alike. Scoring reads the arrays; river, which learns from dicts, gets a row as a dict."""

    def __init__(self, indptr: np.ndarray, buckets: np.ndarray, values: np.ndarray) -> None:
        self.indptr = indptr
        self.buckets = buckets
        self.values = values

    @classmethod
    def from_dicts(cls, rows: Sequence[SparseVector]) -> SparseRows:
        if isinstance(rows, SparseRows):
            return rows
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in rows], out=indptr[1:])
        total = int(indptr[-1])
        buckets = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=total)
        values = np.fromiter(itertools.chain.from_iterable(x.values() for x in rows), dtype=np.float64, count=total)
        return cls(indptr, buckets, values)

    def with_constant(self, bucket: int, value: float = 1.0) -> SparseRows:
        """Every row plus one more entry (an intercept's bucket), appended at its end."""
        ends = self.indptr[1:]
        return SparseRows(
            self.indptr + np.arange(len(self.indptr)),
            np.insert(self.buckets, ends, bucket),
            np.insert(self.values, ends, value),
        )

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, i: int) -> SparseVector:
        start, end = self.indptr[i], self.indptr[i + 1]
        return dict(zip(self.buckets[start:end].tolist(), self.values[start:end].tolist()))

    def __iter__(self) -> Iterator[SparseVector]:
        return (self[i] for i in range(len(self)))


class HashedNgrams:
    """Text → {hash bucket: weight}, L2-normalised binary n-gram presence.

    crc32 rather than ``hash()`` so that buckets are the same in every process
    (workers, learner, replays) regardless of PYTHONHASHSEED. An n-gram's hash is mixed from
    its words' hashes, so no n-gram strings are built or hashed. One text at a time
    (:meth:`transform`, in-process online learning) runs in plain Python; a worker's batches
    (:meth:`transform_batch`) run in numpy, where per-call overhead pays off.
    """

    def __init__(self, config: FeatureConfig) -> None:
        self.config = config
        self._n = config.n_features
        # Words are Zipf-distributed: remembering their hashes skips most of the hashing.
        self._hashes: dict[str, int] = {_SEP: _SEP_HASH}

    def tokens(self, text: str) -> list[str]:
        if self.config.lowercase:
            text = text.lower()
        return (_ASCII_TOKEN if text.isascii() else _TOKEN).findall(text)

    def _remember(self, grams: Iterable[str]) -> Callable[[str], int]:
        """Hash the grams not remembered yet; returns the lookup of every remembered hash."""
        new = set(grams).difference(self._hashes)  # set operations in C: most words are known
        if new:
            if len(self._hashes) + len(new) > _MAX_REMEMBERED:
                self._hashes = {_SEP: _SEP_HASH}
                new = set(grams)
            self._hashes.update((g, zlib.crc32(g.encode("utf-8"))) for g in new)
        # Every gram asked for is remembered now, so the lookup never misses.
        return self._hashes.__getitem__

    def _hash_all(self, grams: list[str]) -> np.ndarray:
        """The hash of every gram (:data:`_SEP` included), hashing only those not remembered yet."""
        hashes = np.fromiter(map(self._hashes.get, grams, itertools.repeat(_UNKNOWN)), dtype=np.uint64, count=len(grams))
        missing = np.flatnonzero(hashes == _UNKNOWN).tolist()
        if missing:
            lookup = self._remember([grams[i] for i in missing])
            hashes[missing] = [lookup(grams[i]) for i in missing]
        return hashes

    def _char_keys(self, words: list[str]) -> set[int]:
        if self.config.char_ngrams is None:
            return set()
        lo, hi = self.config.char_ngrams
        grams: set[str] = set()
        for w in set(words):
            padded = f"<{w}>"
            grams.update("#" + padded[i : i + n] for n in range(lo, hi + 1) for i in range(len(padded) - n + 1))
        return set(map(self._remember(grams), grams))

    def transform(self, text: str) -> SparseVector:
        words = self.tokens(text)
        hashes = list(map(self._remember(words), words))
        keys = set(hashes)
        run = hashes
        for _ in range(2, self.config.ngram_max + 1):
            run = [((a * _MIX) ^ b) & _LOW32 for a, b in zip(run, hashes[len(hashes) - len(run) + 1 :])]
            keys.update(run)
        keys |= self._char_keys(words)
        if not keys:
            return {}
        buckets = {k % self._n for k in keys}
        return dict.fromkeys(buckets, 1.0 / math.sqrt(len(buckets)))

    def transform_batch(self, texts: Sequence[str]) -> SparseRows:
        """:meth:`transform` of every text, as one CSR batch (same buckets and values)."""
        joined = _SEP.join(texts)
        if texts and joined.count(_SEP) != len(texts) - 1:
            # A text holding _SEP itself: to the tokeniser NUL is a gap between words, as a space
            # is, so replacing it changes no text's tokens (and keeps the texts apart).
            joined = _SEP.join(t.replace(_SEP, " ") for t in texts)
        if self.config.lowercase:
            joined = joined.lower()
        flat = (_ASCII_BATCH_TOKEN if joined.isascii() else _BATCH_TOKEN).findall(joined)
        hashes = self._hash_all(flat)
        ends = hashes == np.uint64(_SEP_HASH)
        doc = np.cumsum(ends)[~ends]  # text i's words follow i separators
        hashes = hashes[~ends]
        keys, docs = [hashes], [doc]
        run = hashes
        for n in range(2, self.config.ngram_max + 1):
            # run[i]: the n-gram starting at word i, over the whole batch; those that run into
            # the next text are dropped.
            run = ((run[:-1] * np.uint64(_MIX)) ^ hashes[n - 1 :]) & np.uint64(_LOW32)
            starts = doc[: len(run)]
            inside = starts == doc[n - 1 :]
            keys.append(run[inside])
            docs.append(starts[inside])
        if self.config.char_ngrams is not None:
            for i, ws in enumerate(self.tokens(t) for t in texts):
                extra = np.fromiter(self._char_keys(ws), dtype=np.uint64)
                keys.append(extra)
                docs.append(np.full(len(extra), i, dtype=np.int64))
        buckets = np.concatenate(keys) % np.uint64(self._n)
        # One sort of (text, bucket) pairs dedups each text's buckets and groups them by text.
        # (By hand: numpy 2's np.unique took 20 times as long on these.)
        pairs = np.sort(np.concatenate(docs) * self._n + buckets.astype(np.int64))
        pairs = pairs[np.concatenate(([True], pairs[1:] != pairs[:-1]))] if len(pairs) else pairs
        row, bucket = np.divmod(pairs, self._n)
        counts = np.bincount(row, minlength=len(texts))
        indptr = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return SparseRows(indptr, bucket, 1.0 / np.sqrt(counts[row]))
