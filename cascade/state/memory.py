"""MemoryState: the shared state inside one process (the embedded default).

Same semantics as RedisState, guarded by one lock; expiry is lazy on access plus a periodic
sweep, so memory stays bounded by what is alive. Budget windows align to the clock's epoch,
like Redis's TIME-based windows.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from cascade.config import BudgetConfig, StateConfig
from cascade.logging import get_logger
from cascade.messages import LiveParams, RoutingSnapshot
from cascade.state.base import StaleVersion, StateStore, VersionCallback, registry_entry
from cascade.state.records import (
    BudgetLimit,
    BudgetRequest,
    BudgetTake,
    CachedDecision,
    LearnerStep,
    LoadedSet,
    RegistryEntry,
    RegistrySet,
)

log = get_logger("cascade.state.memory")

_SWEEP_EVERY = 4096  # writes between sweeps of expired entries


class _TTLMap:
    """key -> (value, expires_at or inf); not thread-safe (MemoryState holds the lock)."""

    def __init__(self, clock: Callable[[], float], max_entries: int | None = None) -> None:
        self._clock = clock
        self._max = max_entries
        self._data: OrderedDict[str, tuple[Any, float]] = OrderedDict()
        self._writes = 0

    def get(self, key: str) -> Any:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._data[key]
            return None
        return item[0]

    def set(self, key: str, value: Any, expires_at: float = math.inf) -> None:
        self._data[key] = (value, expires_at)
        self._data.move_to_end(key)
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            self.sweep()
        if self._max is not None:
            while len(self._data) > self._max:  # oldest write goes first
                self._data.popitem(last=False)

    def delete(self, key: str) -> None:
        self._data.pop(key, None)

    def sweep(self) -> None:
        now = self._clock()
        for k in [k for k, (_, exp) in self._data.items() if exp <= now]:
            del self._data[k]

    def __len__(self) -> int:
        return len(self._data)


class MemoryState(StateStore):
    def __init__(
        self,
        state: StateConfig | None = None,
        budget: BudgetConfig | None = None,
        *,
        max_cache_entries: int | None = 1_000_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(state, budget)
        self._clock = clock
        self._lock = threading.RLock()
        self._cache = _TTLMap(clock, max_cache_entries)
        self._events = _TTLMap(clock)
        self._budget = _TTLMap(clock)
        self._blobs: dict[str, dict[int, tuple[bytes, RegistryEntry]]] = {}
        self._current: dict[str, int] = {}
        # The registry's sets, as in Redis: the epoch (grows with every rollback), the current
        # set's version, a counter that only grows, and the kept sets.
        self._epoch = 0
        self._head = 0
        self._counter = 0
        self._sets: dict[int, RegistrySet] = {}
        self._listeners: list[VersionCallback] = []
        self._marker: str | None = None
        self._live_params: LiveParams | None = None
        self._routing: dict[str, RoutingSnapshot] = {}

    # ------------------------------------------------------------------ cache

    def _get_cached(self, keys: Sequence[str]) -> list[CachedDecision | None]:
        with self._lock:
            return [self._cache.get(k) for k in keys]

    def _put_cached(self, records: Sequence[tuple[str, CachedDecision]], ttl_s: float) -> None:
        with self._lock:
            expires = self._clock() + ttl_s
            for k, rec in records:
                self._cache.set(k, rec, expires)

    # ------------------------------------------------------------------ budgets

    def _take(self, requests: Sequence[BudgetRequest], limits: Sequence[BudgetLimit]) -> list[BudgetTake]:
        with self._lock:
            return [self._apply(r, limits, check=True) for r in requests]

    def _charge(self, request: BudgetRequest, limits: Sequence[BudgetLimit]) -> None:
        with self._lock:
            self._apply(request, limits, check=False)

    def _remaining(self, tenant: str, limits: Sequence[BudgetLimit]) -> dict[str, float]:
        with self._lock:
            return self._apply(BudgetRequest(tenant, 0, 0, 0.0), limits, check=False).remaining

    def _apply(self, r: BudgetRequest, limits: Sequence[BudgetLimit], check: bool) -> BudgetTake:
        """The Lua script's logic: check every window, then count in all or none."""
        now = self._clock()
        amounts = {"calls": r.calls, "tokens": r.tokens, "money": r.money}
        keys, used = [], []
        denied: str | None = None
        for lim in limits:
            wid = math.floor(now / lim.seconds)
            key = f"{r.tenant}:{lim.name}:{wid}"
            cur = self._budget.get(key) or 0
            keys.append((key, (wid + 1) * lim.seconds + 1))
            used.append(cur)
            a = amounts[lim.metric]
            cap = lim.paced_cap(now - wid * lim.seconds) if lim.paced else lim.limit
            if check and denied is None and (cur >= lim.limit or cur + a > cap):
                denied = lim.name
        if denied is None:
            for i, lim in enumerate(limits):
                a = amounts[lim.metric]
                if a:
                    used[i] += a
                    self._budget.set(keys[i][0], used[i], keys[i][1])
        remaining = {lim.name: lim.limit - u for lim, u in zip(limits, used)}
        return BudgetTake(allowed=denied is None, reason=denied, remaining=remaining)

    # ------------------------------------------------------------------ registry

    def publish(self, name: str, version: int, blob: bytes) -> RegistryEntry:
        with self._lock:
            entry = self._store(name, version, bytes(blob))
        log.info("state.registry.published", model=name, version=version, size=entry.size)
        self._notify(name, version)
        return entry

    def _store(self, name: str, version: int, blob: bytes) -> RegistryEntry:
        """Keep a snapshot, make it current, drop all but the newest K (lock held)."""
        entry = registry_entry(name, version, blob)
        kept = self._blobs.setdefault(name, {})
        kept[version] = (blob, entry)
        self._current[name] = version
        keep = self.state_config.registry_keep
        for old in sorted(kept)[: max(0, len(kept) - keep)]:
            if old != version:  # never drop the version just made current
                del kept[old]
        return entry

    def current_versions(self, names: Iterable[str] | None = None) -> dict[str, int]:
        with self._lock:
            if names is None:
                return dict(self._current)
            return {n: self._current[n] for n in names if n in self._current}

    def registry_head(self, names: Iterable[str] | None = None) -> tuple[int, dict[str, int]]:
        with self._lock:
            return self._epoch, self.current_versions(names)

    def publish_set(
        self, models: Mapping[str, bytes], step: LearnerStep | None, *, base_epoch: int, base_version: int,
        min_version: int = 0, publisher: str | None = None,
    ) -> RegistrySet:
        """``lua.PUBLISH_SET``'s logic under the lock."""
        with self._lock:
            if (self._epoch, self._head) != (base_epoch, base_version):
                raise StaleVersion(base_epoch, base_version, self._epoch, self._head)
            floor = max([min_version, *(v + 1 for v in self._current.values())])
            self._counter = version = max(self._counter + 1, floor)
            for name, blob in models.items():
                self._store(name, version, bytes(blob))
            published = RegistrySet(version=version, epoch=self._epoch, names=list(models), step=step,
                                    publisher=publisher)
            self._sets[version] = published
            for old in sorted(self._sets)[: max(0, len(self._sets) - self.state_config.registry_keep)]:
                if old != version:
                    del self._sets[old]
            self._head = version
        log.info("state.registry.published_set", version=version, epoch=published.epoch, models=list(models))
        for name in models:
            self._notify(name, version)
        return published

    def load_set(self, names: Iterable[str]) -> LoadedSet:
        with self._lock:
            found = {}
            for name in names:
                item = self.fetch(name)
                if item is not None:
                    found[name] = item
            return LoadedSet(self._epoch, self._head, self._sets.get(self._head), found)

    def registry_sets(self) -> list[RegistrySet]:
        with self._lock:
            return [self._sets[v] for v in sorted(self._sets)]

    def rollback_set(self, version: int | None = None) -> tuple[int, RegistrySet]:
        with self._lock:
            if version is None:
                older = [v for v in self._sets if v < self._head]
                if not older:
                    raise KeyError("no kept set before the current one")
                version = max(older)
            target = self._sets.get(version)
            if target is None:
                raise KeyError(f"set {version} is not kept")
            for name in target.names:
                if version not in self._blobs.get(name, {}):
                    raise KeyError(f"{name} version {version} is not kept")
            for name in target.names:
                self._current[name] = version
            self._head = version
            self._epoch += 1
            epoch = self._epoch
        log.warning("state.registry.rolled_back", version=version, epoch=epoch)
        for name in target.names:
            self._notify(name, version)
        return epoch, target

    def fetch(self, name: str, version: int | None = None) -> tuple[int, bytes] | None:
        with self._lock:
            version = self._current.get(name) if version is None else version
            item = self._blobs.get(name, {}).get(version) if version is not None else None
            return None if item is None or version is None else (version, item[0])

    def versions(self, name: str) -> list[RegistryEntry]:
        with self._lock:
            kept = self._blobs.get(name, {})
            return [kept[v][1] for v in sorted(kept)]

    def rollback(self, name: str, version: int) -> None:
        with self._lock:
            if version not in self._blobs.get(name, {}):
                raise KeyError(f"{name} version {version} is not kept")
            self._current[name] = version
            self._epoch += 1  # an operator's step down, as in Redis
        log.info("state.registry.rollback", model=name, version=version)
        self._notify(name, version)

    def subscribe(self, callback: VersionCallback) -> Callable[[], None]:
        with self._lock:
            self._listeners.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return unsubscribe

    def _notify(self, name: str, version: int) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for cb in listeners:  # outside the lock: a callback may call back into the store
            try:
                cb(name, version)
            except Exception:
                log.exception("state.registry.listener_failed", model=name, version=version)

    # ------------------------------------------------------------------ live parameters

    def get_live_params(self) -> LiveParams | None:
        with self._lock:
            return None if self._live_params is None else self._live_params.model_copy(deep=True)

    def set_live_params(self, params: LiveParams) -> None:
        with self._lock:
            self._live_params = params.model_copy(deep=True)

    def put_routing(self, snapshot: RoutingSnapshot) -> None:
        with self._lock:
            self._routing[snapshot.tier] = snapshot

    def get_routing(self) -> dict[str, RoutingSnapshot]:
        with self._lock:
            return dict(self._routing)

    # ------------------------------------------------------------------ idempotency

    def _claim(self, ids: Sequence[str], ttl_s: float, marks: Sequence[str]) -> list[bool]:
        with self._lock:
            expires = self._clock() + ttl_s
            out = []
            for i, mark in zip(ids, marks):
                new = self._events.get(i) is None
                if new:
                    self._events.set(i, mark, expires)
                out.append(new)
            return out

    def release_events(self, ids: Sequence[str]) -> None:
        with self._lock:
            for i in ids:
                self._events.delete(i)

    def marks(self, ids: Sequence[str]) -> list[str | None]:
        with self._lock:
            return [self._events.get(i) for i in ids]

    def pipeline_marker(self) -> str | None:
        return self._marker

    def mark_pipeline(self, value: str, *, replace: bool = False) -> bool:
        with self._lock:
            if self._marker is not None and not replace:
                return False
            self._marker = value
            return True

    def ping(self) -> bool:
        return True
