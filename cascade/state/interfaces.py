"""The narrow views of the shared state that callers depend on: each caller sees only what it uses.

``StateStore`` (``MemoryState``, ``RedisState``) implements all of them; a function that only
reads the model registry takes a ``ModelRegistry``, one that only takes budget a ``Budgets``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from cascade.messages import Decision, LiveParams, RoutingSnapshot
from cascade.state.records import (
    BudgetLimit,
    BudgetRequest,
    BudgetTake,
    LearnerStep,
    LoadedSet,
    RegistryEntry,
    RegistrySet,
)

if TYPE_CHECKING:
    from cascade.state.watcher import ModelWatcher


class DecisionCache(Protocol):
    def get_decisions(self, keys: Sequence[str], event_ids: Sequence[str] | None = None) -> list[Decision | None]: ...

    def put_decisions(self, items: Iterable[tuple[str, Decision]], ttl_s: float | None = None) -> int: ...


class Idempotency(Protocol):
    def claim_events(self, ids: Sequence[str], ttl_s: float | None = None, marks: Sequence[str] | None = None) -> list[bool]: ...

    def release_events(self, ids: Sequence[str]) -> None: ...

    def seen(self, ids: Sequence[str]) -> list[bool]: ...

    def marks(self, ids: Sequence[str]) -> list[str | None]: ...

    def marks_and_decisions(self, ids: Sequence[str], keys: Sequence[str]) -> tuple[list[str | None], list[Decision | None]]:
        """``marks`` and the decision cache's ``get_decisions`` in one round trip (the first tier's read)."""
        ...

    def seen_and_decisions(self, ids: Sequence[str], keys: Sequence[str]) -> tuple[list[bool], list[Decision | None]]:
        """``seen`` and the decision cache's ``get_decisions`` in one round trip (the first tier's read)."""
        ...


class Budgets(Protocol):
    limits: list[BudgetLimit]

    def take_budgets(
        self, requests: Sequence[BudgetRequest], limits: Sequence[BudgetLimit] | None = None
    ) -> list[BudgetTake]: ...

    def charge(
        self, tenant: str = "default", calls: int = 0, tokens: int = 0, money: float = 0.0,
        limits: Sequence[BudgetLimit] | None = None,
    ) -> None: ...

    def budget_remaining(self, tenant: str = "default", limits: Sequence[BudgetLimit] | None = None) -> dict[str, float]: ...


class ModelRegistry(Protocol):
    def publish(self, name: str, version: int, blob: bytes) -> RegistryEntry: ...

    def current_versions(self, names: Iterable[str] | None = None) -> dict[str, int]: ...

    def fetch(self, name: str, version: int | None = None) -> tuple[int, bytes] | None: ...

    def versions(self, name: str) -> list[RegistryEntry]: ...

    def rollback(self, name: str, version: int) -> None: ...

    def subscribe(self, callback: Callable[[str, int], None]) -> Callable[[], None]: ...

    def registry_head(self, names: Iterable[str] | None = None) -> tuple[int, dict[str, int]] | None: ...

    def publish_set(
        self, models: Mapping[str, bytes], step: LearnerStep | None, *, base_epoch: int, base_version: int,
        min_version: int = 0, publisher: str | None = None,
    ) -> RegistrySet: ...

    def load_set(self, names: Iterable[str]) -> LoadedSet: ...

    def registry_sets(self) -> list[RegistrySet]: ...

    def rollback_set(self, version: int | None = None) -> tuple[int, RegistrySet]: ...

    def watcher(
        self, names: Iterable[str] | None = None, poll_interval_s: float = 1.0, known: dict[str, int] | None = None,
        epoch: int | None = None,
    ) -> ModelWatcher: ...


class LiveParameters(Protocol):
    """What replays and operators set live, and what each stage shares for the deferral costs."""

    def get_live_params(self) -> LiveParams | None: ...

    def set_live_params(self, params: LiveParams) -> None: ...

    def put_routing(self, snapshot: RoutingSnapshot) -> None: ...

    def get_routing(self) -> dict[str, RoutingSnapshot]: ...
