"""ModelWatcher: which models have a new current version, cheap enough to ask every batch.

Pub/sub notices only wake it; the truth is the registry's current-version key, read at most
once per ``poll_interval_s`` otherwise. So a worker that missed a notice (reconnecting, not
yet subscribed) still sees the newest version within one poll interval.

It never steps down: a version lower than the one it reported is ignored unless the
registry's epoch grew since (an operator's rollback). A stale publisher or a Redis that lost
its data can therefore not swap the serving workers back to an older model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from cascade.logging import get_logger

if TYPE_CHECKING:
    from cascade.state.base import StateStore


log = get_logger("cascade.state.watcher")


class ModelWatcher:
    def __init__(
        self,
        store: StateStore,
        names: Iterable[str] | None = None,
        *,
        poll_interval_s: float = 1.0,
        known: dict[str, int] | None = None,
        epoch: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._names = None if names is None else frozenset(names)
        self._poll_interval_s = poll_interval_s
        self._clock = clock
        self._seen: dict[str, int] = dict(known or {})
        self._epoch = epoch  # None: taken from the first read
        self._refused: dict[str, int] = {}  # name -> the lower version last refused (logged once)
        self._wake = threading.Event()
        self._wake.set()  # the first call reads the registry
        self._next_poll = 0.0
        self._unsubscribe: Callable[[], None] | None = store.subscribe(self._on_notice)

    def _on_notice(self, name: str, version: int) -> None:
        if self._names is None or name in self._names:
            self._wake.set()

    def changed(self) -> dict[str, int]:
        """Models whose current version differs from the last one reported (rollbacks included).

        Returns {} at once unless woken by a notice or the poll interval has passed.
        """
        now = self._clock()
        if not self._wake.is_set() and now < self._next_poll:
            return {}
        self._wake.clear()  # before reading: a notice arriving during the read wakes the next call
        self._next_poll = now + self._poll_interval_s
        head = self._store.registry_head(self._names)
        if head is None:  # unreachable
            return {}
        epoch, current = head
        rolled_back = self._epoch is not None and epoch > self._epoch
        self._epoch = epoch  # also when it went down (an emptied Redis): a later rollback counts from here
        diff = {}
        for name, version in current.items():
            seen = self._seen.get(name)
            if seen is None or version > seen or (rolled_back and version != seen):
                diff[name] = version
            elif version < seen and self._refused.get(name) != version:
                self._refused[name] = version
                log.warning("registry_step_down_refused", model=name, version=version, serving=seen, epoch=epoch)
        self._seen.update(diff)
        return diff

    def wait(self, timeout_s: float) -> dict[str, int]:
        """Block until a notice arrives or the poll interval ends (at most ``timeout_s``); then ``changed()``."""
        deadline = self._clock() + timeout_s
        while True:
            found = self.changed()
            now = self._clock()
            if found or now >= deadline:
                return found
            self._wake.wait(min(deadline, self._next_poll) - now)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        """Endless (name, version) stream for a hot-swap thread; stops after ``close()``."""
        while self._unsubscribe is not None:
            yield from self.wait(self._poll_interval_s).items()

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
            self._wake.set()
