"""The one interface of the shared state: decision cache, budgets, model registry, live
parameters and idempotency. ``MemoryState`` serves a single process, ``RedisState`` many.

Outage rule (RedisState): the hot path degrades instead of raising — cache reads miss, writes
are dropped, event claims succeed, budget takes follow ``BudgetConfig.fail_closed`` — while
control-plane writes (publish, rollback, set_live_params) raise ``StateUnavailable`` so their
caller can retry.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Self

from cascade.config import BudgetConfig, StateConfig
from cascade.messages import Decision, LiveParams, RoutingSnapshot
from cascade.state.keys import EPOCH_FIELD, NO_MARK, SET_FIELD
from cascade.state.records import (
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

if TYPE_CHECKING:
    from cascade.state.watcher import ModelWatcher

VersionCallback = Callable[[str, int], None]


class StateUnavailable(RuntimeError):
    """The state store cannot be reached (only raised by control-plane writes)."""


class StaleVersion(RuntimeError):
    """A set publish based on a version or epoch that is no longer current: someone published a
    newer set, or an operator rolled back. Nothing was written; reload and continue from there."""

    def __init__(self, base_epoch: int, base_version: int, epoch: int, version: int) -> None:
        super().__init__(f"registry moved on: based on epoch {base_epoch} version {base_version}, "
                         f"current is epoch {epoch} version {version}")
        self.epoch, self.version = epoch, version


class StateStore(ABC):
    def __init__(self, state: StateConfig | None = None, budget: BudgetConfig | None = None) -> None:
        self.state_config = state or StateConfig()
        self.budget_config = budget or BudgetConfig()
        self.limits: list[BudgetLimit] = limits_from_config(self.budget_config)
        # Plain counters the lead wires to Prometheus: cache_hits, budget_denied, ...
        self.stats: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()  # operation -> calls that failed or were skipped in an outage
        self.outages = 0  # times the store went from reachable to unreachable
        self._count_lock = threading.Lock()

    def _count(self, counter: Counter[str], **amounts: int) -> None:
        with self._count_lock:  # Counter updates are not atomic across threads
            counter.update(amounts)

    # ------------------------------------------------------------------ decision cache

    def get_decisions(self, keys: Sequence[str], event_ids: Sequence[str] | None = None) -> list[Decision | None]:
        """Cached decisions for ``keys`` (one batched read); a hit is reason "cache" for ``event_ids[i]``."""
        if event_ids is not None and len(event_ids) != len(keys):
            raise ValueError("keys and event_ids differ in length")
        if not keys:
            return []
        return self._answers(self._get_cached(keys), event_ids)

    def seen_and_decisions(self, ids: Sequence[str], keys: Sequence[str]) -> tuple[list[bool], list[Decision | None]]:
        """``seen(ids)`` and ``get_decisions(keys, ids)`` together: one round trip to a remote store."""
        marks, decisions = self.marks_and_decisions(ids, keys)
        return [m is not None for m in marks], decisions

    def marks_and_decisions(self, ids: Sequence[str], keys: Sequence[str]) -> tuple[list[str | None], list[Decision | None]]:
        """``marks(ids)`` and ``get_decisions(keys, ids)`` together: one round trip to a remote store."""
        if len(ids) != len(keys):
            raise ValueError("ids and keys differ in length")
        if not ids:
            return [], []
        marks, records = self._marks_and_cached(ids, keys)
        return marks, self._answers(records, ids)

    def _answers(self, records: Sequence[CachedDecision | None], event_ids: Sequence[str] | None) -> list[Decision | None]:
        hits = sum(r is not None for r in records)
        self._count(self.stats, cache_hits=hits, cache_misses=len(records) - hits)
        return [
            None if r is None else r.answer(event_ids[i] if event_ids is not None else None)
            for i, r in enumerate(records)
        ]

    def _marks_and_cached(self, ids: Sequence[str], keys: Sequence[str]) -> tuple[list[str | None], list[CachedDecision | None]]:
        """Stores that can pipeline both reads override this."""
        return self.marks(ids), self._get_cached(keys)

    def put_decisions(self, items: Iterable[tuple[str, Decision]], ttl_s: float | None = None) -> int:
        """Cache the cacheable decisions (see ``records.cacheable``); returns how many were written."""
        cheap = self.state_config.cache_cheap_answers
        records = [(k, CachedDecision.of(d)) for k, d in items if cacheable(d, cheap)]
        if records:
            self._put_cached(records, self._ttl(ttl_s, self.state_config.cache_ttl_s))
            self._count(self.stats, cache_puts=len(records))
        return len(records)

    @abstractmethod
    def _get_cached(self, keys: Sequence[str]) -> list[CachedDecision | None]: ...

    @abstractmethod
    def _put_cached(self, records: Sequence[tuple[str, CachedDecision]], ttl_s: float) -> None: ...

    # ------------------------------------------------------------------ LLM budgets

    def take_budget(
        self,
        tenant: str = "default",
        calls: int = 1,
        tokens: int = 0,
        money: float = 0.0,
        limits: Sequence[BudgetLimit] | None = None,
    ) -> BudgetTake:
        """Check every window and count the call in all of them only if all allow it (atomically)."""
        return self.take_budgets([BudgetRequest(tenant, calls, tokens, money)], limits)[0]

    def take_budgets(
        self, requests: Sequence[BudgetRequest], limits: Sequence[BudgetLimit] | None = None
    ) -> list[BudgetTake]:
        """``take_budget`` for a batch in one round trip; each request is all-or-nothing, in order."""
        limits = self.limits if limits is None else limits
        for r in requests:
            if r.calls < 0 or r.tokens < 0 or r.money < 0:
                raise ValueError("budget takes must not be negative (use charge to refund)")
        if not limits:  # nothing to enforce: no store round trip
            return [BudgetTake(allowed=True) for _ in requests]
        takes = self._take(requests, limits)
        allowed = sum(t.allowed for t in takes)
        self._count(self.stats, budget_allowed=allowed, budget_denied=len(takes) - allowed)
        return takes

    def charge(
        self,
        tenant: str = "default",
        calls: int = 0,
        tokens: int = 0,
        money: float = 0.0,
        limits: Sequence[BudgetLimit] | None = None,
    ) -> None:
        """Add usage known only after the call (tokens, money) to the current windows, unchecked.

        Negative amounts refund (e.g. ``calls=-1`` for a call that was never made).
        """
        limits = self.limits if limits is None else limits
        if limits and (calls or tokens or money):
            self._charge(BudgetRequest(tenant, calls, tokens, money), limits)

    def budget_remaining(
        self, tenant: str = "default", limits: Sequence[BudgetLimit] | None = None
    ) -> dict[str, float]:
        """What is left in each current window (empty when unlimited or unreachable)."""
        limits = self.limits if limits is None else limits
        return self._remaining(tenant, limits) if limits else {}

    @abstractmethod
    def _take(self, requests: Sequence[BudgetRequest], limits: Sequence[BudgetLimit]) -> list[BudgetTake]: ...

    @abstractmethod
    def _charge(self, request: BudgetRequest, limits: Sequence[BudgetLimit]) -> None: ...

    @abstractmethod
    def _remaining(self, tenant: str, limits: Sequence[BudgetLimit]) -> dict[str, float]: ...

    # ------------------------------------------------------------------ model registry

    @abstractmethod
    def publish(self, name: str, version: int, blob: bytes) -> RegistryEntry:
        """Store a snapshot, make it the current version, drop all but the last K, notify watchers."""

    @abstractmethod
    def current_versions(self, names: Iterable[str] | None = None) -> dict[str, int]:
        """Current version per model name (all names when None); one cheap read."""

    def latest_version(self, name: str) -> int | None:
        return self.current_versions([name]).get(name)

    @abstractmethod
    def fetch(self, name: str, version: int | None = None) -> tuple[int, bytes] | None:
        """(version, bytes) of the current (or a kept) version; None when there is none."""

    @abstractmethod
    def versions(self, name: str) -> list[RegistryEntry]:
        """The kept versions, oldest first."""

    @abstractmethod
    def rollback(self, name: str, version: int) -> None:
        """Make a kept older version current again (KeyError when it is not kept); notifies.

        An operator's explicit step down: it bumps the registry's epoch like ``rollback_set``."""

    @abstractmethod
    def subscribe(self, callback: VersionCallback) -> Callable[[], None]:
        """Call ``callback(name, version)`` on each publish/rollback notice; returns an unsubscribe.

        Notices can be missed (a dropped connection): use ``watcher()`` for a reliable view.
        """

    @abstractmethod
    def registry_head(self, names: Iterable[str] | None = None) -> tuple[int, dict[str, int]] | None:
        """(epoch, current version per name) in one read; None while the store is unreachable."""

    @abstractmethod
    def publish_set(
        self, models: Mapping[str, bytes], step: LearnerStep | None, *, base_epoch: int, base_version: int,
        min_version: int = 0, publisher: str | None = None,
    ) -> RegistrySet:
        """Publish every model under one new version, atomically, with the learner's step.

        The version is the pipeline's counter plus one (never below ``min_version`` nor any
        current version). Raises :class:`StaleVersion` unless the current set is
        ``base_version`` in ``base_epoch`` (a fresh registry: 0 and 0): a publisher never
        overwrites a set it has not seen. ``publisher`` names who published the set, so a
        publisher can recognise its own publish that timed out on the client but was applied.
        """

    @abstractmethod
    def load_set(self, names: Iterable[str]) -> LoadedSet:
        """The current epoch, set and the current snapshots of ``names``, read consistently.

        Raises ``StateUnavailable`` when unreachable (a learner must wait, not start afresh).
        """

    @abstractmethod
    def registry_sets(self) -> list[RegistrySet]:
        """The kept sets, oldest first."""

    @abstractmethod
    def rollback_set(self, version: int | None = None) -> tuple[int, RegistrySet]:
        """Make a kept set current again (default: the newest kept one before the current) and
        bump the epoch, so watchers accept the step down and stale publishers fail; returns the
        new epoch and the set. KeyError when that set (or one of its models) is not kept."""

    def watcher(
        self, names: Iterable[str] | None = None, poll_interval_s: float = 1.0, known: dict[str, int] | None = None,
        epoch: int | None = None,
    ) -> ModelWatcher:
        from cascade.state.watcher import ModelWatcher

        return ModelWatcher(self, names, poll_interval_s=poll_interval_s, known=known, epoch=epoch)

    # ------------------------------------------------------------------ live parameters

    @abstractmethod
    def get_live_params(self) -> LiveParams | None: ...

    @abstractmethod
    def set_live_params(self, params: LiveParams) -> None: ...

    # ------------------------------------------------------------------ routing of each stage

    @abstractmethod
    def put_routing(self, snapshot: RoutingSnapshot) -> None:
        """Share a stage's routing statistics (dropped in an outage: they are refreshed often)."""

    @abstractmethod
    def get_routing(self) -> dict[str, RoutingSnapshot]: ...

    # ------------------------------------------------------------------ idempotency

    def claim_events(self, ids: Sequence[str], ttl_s: float | None = None, marks: Sequence[str] | None = None) -> list[bool]:
        """True for each id seen for the first time (now claimed); False for a redelivery.

        ``marks``: what to record of each event (``keys.text_mark`` of its text), so an id seen
        again with another text can be told apart (see :meth:`marks`); else ``keys.NO_MARK``.
        """
        if not ids:
            return []
        if marks is not None and len(marks) != len(ids):
            raise ValueError("ids and marks differ in length")
        claimed = self._claim(ids, self._ttl(ttl_s, self.state_config.idempotency_ttl_s),
                              list(marks) if marks is not None else [NO_MARK] * len(ids))
        new = sum(claimed)
        self._count(self.stats, events_claimed=new, events_duplicate=len(ids) - new)
        return claimed

    @abstractmethod
    def _claim(self, ids: Sequence[str], ttl_s: float, marks: Sequence[str]) -> list[bool]: ...

    @abstractmethod
    def release_events(self, ids: Sequence[str]) -> None:
        """Forget claims (producing the decision failed), so a retry can claim them again."""

    def seen(self, ids: Sequence[str]) -> list[bool]:
        return [m is not None for m in self.marks(ids)]

    @abstractmethod
    def marks(self, ids: Sequence[str]) -> list[str | None]:
        """What each id was claimed with (its text's mark, or ``NO_MARK``); None if never claimed."""

    # ------------------------------------------------------------------ pipeline marker

    @abstractmethod
    def pipeline_marker(self) -> str | None:
        """The pipeline's marker (see ``cascade.state.loss``), None if absent. Raises
        ``StateUnavailable`` when unreachable: an unknown marker is not a missing one."""

    @abstractmethod
    def mark_pipeline(self, value: str, *, replace: bool = False) -> bool:
        """Write the marker (only if absent unless ``replace``); whether it was written. Raises
        ``StateUnavailable`` when unreachable."""

    # ------------------------------------------------------------------ lifecycle

    @property
    def available(self) -> bool:
        """False while the store is known to be unreachable."""
        return True

    @abstractmethod
    def ping(self) -> bool: ...

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _ttl(ttl_s: float | None, default: float) -> float:
        ttl = default if ttl_s is None else ttl_s
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        return ttl


def registry_entry(name: str, version: int, blob: bytes) -> RegistryEntry:
    if version < 0:
        raise ValueError("versions are non-negative")
    return RegistryEntry(
        name=name, version=version, size=len(blob), sha256=hashlib.sha256(blob).hexdigest(), published_at=time.time()
    )


def stored_entry(version: int, raw: str | bytes) -> RegistryEntry:
    """A registry entry as stored: a set publish stores it without the version (its key)."""
    data = json.loads(raw)
    data["version"] = version
    return RegistryEntry.model_validate(data)


def stored_set(version: int, raw: str | bytes) -> RegistrySet:
    """A set as stored under its version (the body carries everything but the version)."""
    data = json.loads(raw)
    data["version"] = version
    return RegistrySet.model_validate(data)


def split_head(current: dict[str, int], names: Iterable[str] | None) -> tuple[int, dict[str, int]]:
    """(epoch, model versions) from the current hash's fields."""
    epoch = current.pop(EPOCH_FIELD, 0)
    current.pop(SET_FIELD, None)
    if names is None:
        return epoch, current
    return epoch, {n: current[n] for n in names if n in current}
