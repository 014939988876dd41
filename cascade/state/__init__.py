"""Shared state: decision cache, LLM budgets, model registry, live parameters, idempotency.

``make_state(config)`` picks the implementation from ``state.backend``: ``memory`` for one
process (the embedded default), ``redis`` for workers that share it.
"""

from __future__ import annotations

from cascade.config import CascadeConfig
from cascade.state.base import StaleVersion, StateStore, StateUnavailable
from cascade.state.keys import cache_key, cache_keys, normalize_text
from cascade.state.memory import MemoryState
from cascade.state.records import (
    UNREACHABLE,
    UNREACHABLE_FAIL_OPEN,
    BudgetLimit,
    BudgetRequest,
    BudgetTake,
    CachedDecision,
    LearnerStep,
    LoadedSet,
    RegistryEntry,
    RegistrySet,
    cacheable,
    limits_from_config,
)
from cascade.state.watcher import ModelWatcher

__all__ = [
    "UNREACHABLE",
    "UNREACHABLE_FAIL_OPEN",
    "BudgetLimit",
    "BudgetRequest",
    "BudgetTake",
    "CachedDecision",
    "LearnerStep",
    "LoadedSet",
    "MemoryState",
    "ModelWatcher",
    "RegistryEntry",
    "RegistrySet",
    "StaleVersion",
    "StateStore",
    "StateUnavailable",
    "cache_key",
    "cache_keys",
    "cacheable",
    "limits_from_config",
    "make_state",
    "normalize_text",
]


def make_state(config: CascadeConfig) -> StateStore:
    if config.state.backend == "redis":
        from cascade.state.redis_store import RedisState  # redis-py only when asked for

        return RedisState(config.redis, config.state, config.budget, pipeline=config.pipeline)
    return MemoryState(config.state, config.budget)
