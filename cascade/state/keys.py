"""Cache keys and the key layout under ``redis.key_prefix``."""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable

# Bump when normalisation or the record format changes, so old entries are simply never hit.
CACHE_KEY_VERSION = "1"


def normalize_text(text: str) -> str:
    """NFKC, casefold, collapse whitespace: inputs that differ only so share one cache entry."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def cache_key(task_name: str, labels: Iterable[str], text: str) -> str:
    """A hash of the task, the label set (order-free) and the normalised text."""
    return cache_keys(task_name, labels, [text])[0]


def cache_keys(task_name: str, labels: Iterable[str], texts: Iterable[str]) -> list[str]:
    """:func:`cache_key` of each text; the task and label part is hashed once."""
    base = hashlib.blake2b(digest_size=16)
    # \x1f/\x1e separators: no label or task name can make two different inputs collide.
    base.update("\x1f".join([CACHE_KEY_VERSION, task_name, "\x1e".join(sorted(labels)), ""]).encode("utf-8"))
    keys = []
    for text in texts:
        h = base.copy()
        h.update(normalize_text(text).encode("utf-8", "surrogatepass"))
        keys.append(h.hexdigest())
    return keys


def text_mark(text: str) -> str:
    """A short hash of the normalised text: what the idempotency record keeps of an event, so an
    id seen again with a different text can be told from a redelivery."""
    return hashlib.blake2b(normalize_text(text).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


# What an id claimed without its text's mark is recorded with: it conflicts with nothing.
NO_MARK = "1"


# Fields of the registry's current hash that are not model names (no registry name starts with '@').
EPOCH_FIELD = "@epoch"
SET_FIELD = "@set"


class KeySpace:
    """Every key the state layer uses, under one prefix: ``redis.key_prefix``, then the pipeline's
    name (``pipeline``), so that pipelines sharing a Redis share nothing. Budgets are the
    pipeline's own unless ``budget_scope`` names a budget shared on purpose."""

    def __init__(self, prefix: str, pipeline: str | None = None, budget_scope: str | None = None) -> None:
        root = prefix
        if pipeline:
            prefix = f"{prefix}{pipeline}:"
        self.prefix = prefix
        self.cache = prefix + "dc:"
        self.event = prefix + "evt:"
        self.budget = f"{root}budget-shared:{budget_scope}:" if budget_scope else prefix + "budget:"
        self.live_params = prefix + "live_params"
        # Written when the pipeline first starts; gone while offsets are committed: Redis was emptied.
        self.marker = prefix + "pipeline"
        self.routing = prefix + "routing"  # hash tier -> RoutingSnapshot JSON
        self.registry_current = prefix + "reg:current"  # hash name -> current version: one poll reads all
        self.registry_channel = prefix + "reg:events"
        self.registry = prefix + "reg:"  # what the Lua scripts append '<name>:versions' etc. to
        self.registry_counter = prefix + "reg:counter"  # the set versions: only grows
        self.registry_sets = prefix + "reg:sets"  # hash version -> RegistrySet JSON ('<this>:order': zset)

    def registry_versions(self, name: str) -> str:
        return f"{self.prefix}reg:{name}:versions"

    def registry_meta(self, name: str) -> str:
        return f"{self.prefix}reg:{name}:meta"

    def registry_blob(self, name: str) -> str:
        """Prefix of the blob keys; the version is appended (also inside the Lua scripts)."""
        return f"{self.prefix}reg:{name}:blob:"
