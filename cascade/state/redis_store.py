"""RedisState: the shared state for many workers, on redis-py.

Every call goes through ``_call``: when Redis is unreachable the call degrades (see
``cascade.state.base``), the outage is logged once and counted, and further calls are skipped
for a short, growing backoff window instead of each waiting for a refused connection.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import redis
from pydantic import TypeAdapter
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from cascade.config import BudgetConfig, RedisConfig, StateConfig
from cascade.logging import get_logger
from cascade.messages import LiveParams, RoutingSnapshot
from cascade.security import redis_client_kwargs
from cascade.state import lua
from cascade.state.base import (
    StaleVersion,
    StateStore,
    StateUnavailable,
    VersionCallback,
    registry_entry,
    split_head,
    stored_entry,
    stored_set,
)
from cascade.state.keys import KeySpace
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
)

log = get_logger("cascade.state.redis")

T = TypeVar("T")
_DOWN_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
_RAISE: Any = object()  # fallback marker: raise StateUnavailable instead of degrading
_TAKES = TypeAdapter(list[BudgetTake])


class _Backoff:
    """Circuit breaker with exponential backoff: after a failure, calls are skipped until a
    deadline; then one caller probes (the others keep skipping) and either closes it or doubles
    the wait, up to ``cap_s``."""

    def __init__(self, base_s: float, cap_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._base, self._cap, self._clock = base_s, cap_s, clock
        self._lock = threading.Lock()
        self._delay = 0.0
        self._until = 0.0
        self.down_since: float | None = None

    def skip(self) -> bool:
        if self.down_since is None:  # fast path, no lock while healthy
            return False
        with self._lock:
            now = self._clock()
            if self.down_since is None or now >= self._until:
                self._until = now + self._delay  # this caller probes; the rest skip meanwhile
                return False
            return True

    def failed(self) -> tuple[bool, float]:
        """Record a failure; (True if this starts an outage, seconds until the next probe)."""
        with self._lock:
            new = self.down_since is None
            if new:
                self.down_since = self._clock()
            self._delay = min(self._cap, self._base if new else self._delay * 2)
            wait = self._delay * random.uniform(0.5, 1.0)  # jitter: workers do not probe in lockstep
            self._until = self._clock() + wait
            return new, wait

    def succeeded(self) -> float | None:
        """Record a success; the outage's length when this ends one."""
        if self.down_since is None:
            return None
        with self._lock:
            since, self.down_since, self._delay = self.down_since, None, 0.0
            return None if since is None else self._clock() - since


# redis-py types replies as bytes or str (it decodes when asked to); this client never asks.
Reply = bytes | str


def _text(r: Reply) -> str:
    return r if isinstance(r, str) else r.decode("utf-8", "replace")


def _marks(raw: Sequence[Reply | None]) -> list[str | None]:
    return [None if r is None else _text(r) for r in raw]


def _cached(raw: Sequence[Reply | None]) -> list[CachedDecision | None]:
    return [None if b is None else CachedDecision.model_validate_json(b) for b in raw]


class RedisState(StateStore):
    def __init__(
        self,
        redis_config: RedisConfig | None = None,
        state: StateConfig | None = None,
        budget: BudgetConfig | None = None,
        *,
        backoff_base_s: float = 0.1,
        backoff_cap_s: float = 2.0,
        max_connections: int | None = 64,
        pipeline: str | None = None,
    ) -> None:
        super().__init__(state, budget)
        self.redis_config = rc = redis_config or RedisConfig()
        self.keys = KeySpace(rc.key_prefix, pipeline, budget.scope if budget is not None else None)
        # One quick retry on a connection error only: it transparently replaces a pooled
        # connection that a server restart killed. Timeouts are not retried: the command may
        # have run, and a repeated budget take would count twice.
        retry = Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1, supported_errors=(redis.ConnectionError,))
        self.pool = redis.ConnectionPool.from_url(
            rc.url,
            socket_timeout=rc.socket_timeout_s,
            socket_connect_timeout=rc.socket_timeout_s,
            retry=retry,
            max_connections=max_connections,
            health_check_interval=30,
            **redis_client_kwargs(rc),
        )
        self.client = redis.Redis(connection_pool=self.pool)
        self._budget_script = self.client.register_script(lua.BUDGET)
        self._publish_script = self.client.register_script(lua.PUBLISH)
        self._rollback_script = self.client.register_script(lua.ROLLBACK)
        self._fetch_script = self.client.register_script(lua.FETCH)
        self._claim_script = self.client.register_script(lua.CLAIM)
        self._publish_set_script = self.client.register_script(lua.PUBLISH_SET)
        self._rollback_set_script = self.client.register_script(lua.ROLLBACK_SET)
        self._load_set_script = self.client.register_script(lua.LOAD_SET)
        self._backoff = _Backoff(backoff_base_s, backoff_cap_s)
        self._listeners: list[VersionCallback] = []
        self._sub_lock = threading.Lock()
        self._sub_thread: threading.Thread | None = None
        self._closing = threading.Event()

    # ------------------------------------------------------------------ outage handling

    def _call(self, op: str, fn: Callable[[], T], fallback: T) -> T:
        if self._backoff.skip():
            self._count(self.errors, **{op: 1})
            return self._degrade(op, fallback)
        try:
            result = fn()
        except _DOWN_ERRORS as e:
            self._count(self.errors, **{op: 1})
            new, wait = self._backoff.failed()
            if new:
                with self._count_lock:
                    self.outages += 1
                log.warning("state.redis.unreachable", op=op, error=str(e), retry_in_s=round(wait, 3))
            else:
                log.debug("state.redis.still_unreachable", op=op, error=str(e), retry_in_s=round(wait, 3))
            return self._degrade(op, fallback, e)
        down_s = self._backoff.succeeded()
        if down_s is not None:
            log.info("state.redis.reconnected", op=op, down_s=round(down_s, 3))
        return result

    @staticmethod
    def _degrade(op: str, fallback: T, cause: BaseException | None = None) -> T:
        if fallback is _RAISE:
            raise StateUnavailable(f"state store unreachable during {op}") from cause
        return fallback

    @property
    def available(self) -> bool:
        """False while in an outage (calls are being skipped or probed)."""
        return self._backoff.down_since is None

    # ------------------------------------------------------------------ cache

    def _get_cached(self, keys: Sequence[str]) -> list[CachedDecision | None]:
        full = [self.keys.cache + k for k in keys]
        return _cached(self._call("get_decisions", lambda: self.client.mget(full), [None] * len(keys)))

    def _marks_and_cached(self, ids: Sequence[str], keys: Sequence[str]) -> tuple[list[str | None], list[CachedDecision | None]]:
        def read() -> list[list[bytes | None]]:
            pipe = self.client.pipeline(transaction=False)
            pipe.mget([self.keys.event + i for i in ids])
            pipe.mget([self.keys.cache + k for k in keys])
            return pipe.execute()

        missing: list[list[bytes | None]] = [[None] * len(ids), [None] * len(keys)]
        marks, cached = self._call("seen_and_decisions", read, missing)
        return _marks(marks), _cached(cached)

    def _put_cached(self, records: Sequence[tuple[str, CachedDecision]], ttl_s: float) -> None:
        px = max(1, int(ttl_s * 1000))

        def put() -> None:
            pipe = self.client.pipeline(transaction=False)
            for k, rec in records:
                pipe.set(self.keys.cache + k, rec.model_dump_json(), px=px)
            pipe.execute()

        self._call("put_decisions", put, None)

    # ------------------------------------------------------------------ budgets

    def _budget_args(self, mode: str, limits: Sequence[BudgetLimit], requests: Iterable[BudgetRequest]) -> list[Any]:
        """Script arguments; see ``lua.BUDGET`` for the packed request format."""
        args: list[Any] = [self.keys.budget, mode, len(limits)]
        for lim in limits:
            args += [lim.name, lim.seconds, repr(float(lim.limit)), lim.metric, 1 if lim.paced else 0]
        tenants: dict[str, int] = {}
        packed = []
        for r in requests:
            ti = tenants.setdefault(r.tenant, len(tenants) + 1)
            packed.append(f"{ti},{int(r.calls)},{int(r.tokens)},{float(r.money)!r}")
        return args + list(tenants) + [";".join(packed)]

    @staticmethod
    def _parse_takes(out: bytes, limits: Sequence[BudgetLimit]) -> list[BudgetTake]:
        names = [lim.name for lim in limits]
        recs = []
        for rec in out.decode().split(";") if out else []:
            denied, *left = rec.split(",")
            d = int(denied)
            recs.append({"allowed": d == 0, "reason": names[d - 1] if d else None, "remaining": dict(zip(names, left))})
        return _TAKES.validate_python(recs)  # one validation call for the batch: the cheapest way in

    def _take(self, requests: Sequence[BudgetRequest], limits: Sequence[BudgetLimit]) -> list[BudgetTake]:
        args = self._budget_args("take", limits, requests)
        out = self._call("take_budget", lambda: self._budget_script(args=args), None)
        if out is None:
            fail_closed = self.budget_config.fail_closed
            reason = UNREACHABLE if fail_closed else UNREACHABLE_FAIL_OPEN
            return [BudgetTake(allowed=not fail_closed, reason=reason) for _ in requests]
        return self._parse_takes(out, limits)

    def _charge(self, request: BudgetRequest, limits: Sequence[BudgetLimit]) -> None:
        args = self._budget_args("charge", limits, [request])
        self._call("charge", lambda: self._budget_script(args=args), None)

    def _remaining(self, tenant: str, limits: Sequence[BudgetLimit]) -> dict[str, float]:
        args = self._budget_args("charge", limits, [BudgetRequest(tenant, 0, 0, 0.0)])
        out = self._call("budget_remaining", lambda: self._budget_script(args=args), None)
        return {} if out is None else self._parse_takes(out, limits)[0].remaining

    # ------------------------------------------------------------------ registry

    def publish(self, name: str, version: int, blob: bytes) -> RegistryEntry:
        entry = registry_entry(name, version, blob)
        k = self.keys
        keys = [k.registry_current, k.registry_versions(name), k.registry_meta(name)]
        args: list[Reply | int] = [name, str(version), blob, entry.model_dump_json(), self.state_config.registry_keep,
                k.registry_blob(name), k.registry_channel]  # fmt: skip
        self._call("publish", lambda: self._publish_script(keys=keys, args=args), _RAISE)
        log.info("state.registry.published", model=name, version=version, size=entry.size)
        return entry

    def current_versions(self, names: Iterable[str] | None = None) -> dict[str, int]:
        head = self.registry_head(names)
        return {} if head is None else head[1]

    def registry_head(self, names: Iterable[str] | None = None) -> tuple[int, dict[str, int]] | None:
        raw: dict[Reply, Reply] | None = self._call(
            "current_versions", lambda: self.client.hgetall(self.keys.registry_current), None
        )
        return None if raw is None else split_head({_text(n): int(v) for n, v in raw.items()}, names)

    def publish_set(
        self, models: Mapping[str, bytes], step: LearnerStep | None, *, base_epoch: int, base_version: int,
        min_version: int = 0, publisher: str | None = None,
    ) -> RegistrySet:
        k = self.keys
        draft = RegistrySet(version=0, epoch=base_epoch, names=list(models), step=step, publisher=publisher)
        args: list[Reply | int] = [base_epoch, base_version, min_version, self.state_config.registry_keep,
                                   k.registry_channel, draft.model_dump_json(exclude={"version"}), k.registry, len(models)]
        for name, blob in models.items():
            entry = registry_entry(name, 0, blob)
            args += [name, blob, entry.model_dump_json(exclude={"version"})]
        keys = [k.registry_current, k.registry_counter, k.registry_sets]
        ok, epoch, version = self._call("publish", lambda: self._publish_set_script(keys=keys, args=args), _RAISE)
        if not ok:
            raise StaleVersion(base_epoch, base_version, int(epoch), int(version))
        log.info("state.registry.published_set", version=int(version), epoch=int(epoch), models=list(models))
        return draft.model_copy(update={"version": int(version)})

    def load_set(self, names: Iterable[str]) -> LoadedSet:
        names = list(names)
        k = self.keys
        out = self._call("load_set", lambda: self._load_set_script(keys=[k.registry_current, k.registry_sets],
                                                                   args=[k.registry, *names]), _RAISE)
        epoch, version, body = int(out[0]), int(out[1]), out[2]
        found = {}
        for i, name in enumerate(names):
            v, blob = out[3 + 2 * i], out[4 + 2 * i]
            if v is not None and blob is not None:
                found[name] = (int(v), bytes(blob))
        return LoadedSet(epoch, version, None if body is None else stored_set(version, body), found)

    def registry_sets(self) -> list[RegistrySet]:
        raw: dict[Reply, Reply] = self._call("registry_sets", lambda: self.client.hgetall(self.keys.registry_sets), _RAISE)
        return sorted((stored_set(int(v), b) for v, b in raw.items()), key=lambda s: s.version)

    def rollback_set(self, version: int | None = None) -> tuple[int, RegistrySet]:
        k = self.keys
        keys = [k.registry_current, k.registry_sets]
        args = ["" if version is None else str(version), k.registry_channel, k.registry]
        out = self._call("rollback", lambda: self._rollback_set_script(keys=keys, args=args), _RAISE)
        if not out[0]:
            raise KeyError(_text(out[1]))
        epoch, target = int(out[1]), int(out[2])
        log.warning("state.registry.rolled_back", version=target, epoch=epoch)
        return epoch, stored_set(target, out[3])

    def latest_version(self, name: str) -> int | None:
        v = self._call("latest_version", lambda: self.client.hget(self.keys.registry_current, name), None)
        return None if v is None else int(v)

    def fetch(self, name: str, version: int | None = None) -> tuple[int, bytes] | None:
        args = [name, "" if version is None else str(version), self.keys.registry_blob(name)]
        keys = [self.keys.registry_current]
        out = self._call("fetch", lambda: self._fetch_script(keys=keys, args=args), None)
        return None if out is None else (int(out[0]), bytes(out[1]))

    def versions(self, name: str) -> list[RegistryEntry]:
        raw: dict[Reply, Reply] = self._call("versions", lambda: self.client.hgetall(self.keys.registry_meta(name)), {})
        return sorted((stored_entry(int(v), b) for v, b in raw.items()), key=lambda e: e.version)

    def rollback(self, name: str, version: int) -> None:
        k = self.keys
        keys = [k.registry_current, k.registry_versions(name)]
        args = [name, str(version), k.registry_channel]
        if not self._call("rollback", lambda: self._rollback_script(keys=keys, args=args), _RAISE):
            raise KeyError(f"{name} version {version} is not kept")
        log.info("state.registry.rollback", model=name, version=version)

    def subscribe(self, callback: VersionCallback) -> Callable[[], None]:
        with self._sub_lock:
            self._listeners.append(callback)
            if self._sub_thread is None:
                self._sub_thread = threading.Thread(target=self._listen, name="state-registry-sub", daemon=True)
                self._sub_thread.start()

        def unsubscribe() -> None:
            with self._sub_lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return unsubscribe

    def _listen(self) -> None:
        """Pub/sub loop: a fresh subscription after any error, with its own growing backoff."""
        pubsub = None
        delay = 0.1
        while not self._closing.is_set():
            try:
                if pubsub is None:
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.keys.registry_channel)
                msg = pubsub.get_message(timeout=0.2)
                delay = 0.1
            except _DOWN_ERRORS as e:
                log.debug("state.redis.subscription_lost", error=str(e), retry_in_s=delay)
                pubsub = self._close_pubsub(pubsub)
                self._closing.wait(delay)
                delay = min(delay * 2, 2.0)
                continue
            if msg and msg.get("type") == "message":
                self._dispatch(msg["data"])
        self._close_pubsub(pubsub)

    def _dispatch(self, data: bytes) -> None:
        try:
            notice = json.loads(data)
            name, version = str(notice["name"]), int(notice["version"])
        except (ValueError, KeyError, TypeError):
            log.warning("state.registry.bad_notice", data=data[:200])
            return
        with self._sub_lock:
            listeners = list(self._listeners)
        for cb in listeners:
            try:
                cb(name, version)
            except Exception:
                log.exception("state.registry.listener_failed", model=name, version=version)

    @staticmethod
    def _close_pubsub(pubsub: Any) -> None:
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # closing a broken connection may raise; it is gone either way
                pass
        return None

    # ------------------------------------------------------------------ live parameters

    def get_live_params(self) -> LiveParams | None:
        raw = self._call("get_live_params", lambda: self.client.get(self.keys.live_params), None)
        return None if raw is None else LiveParams.model_validate_json(raw)

    def set_live_params(self, params: LiveParams) -> None:
        body = params.model_dump_json()
        self._call("set_live_params", lambda: self.client.set(self.keys.live_params, body), _RAISE)

    def put_routing(self, snapshot: RoutingSnapshot) -> None:
        body = snapshot.model_dump_json()
        self._call("put_routing", lambda: self.client.hset(self.keys.routing, snapshot.tier, body), None)

    def get_routing(self) -> dict[str, RoutingSnapshot]:
        raw: dict[Reply, Reply] = self._call("get_routing", lambda: self.client.hgetall(self.keys.routing), {})
        return {_text(k): RoutingSnapshot.model_validate_json(v) for k, v in raw.items()}

    # ------------------------------------------------------------------ idempotency

    def _claim(self, ids: Sequence[str], ttl_s: float, marks: Sequence[str]) -> list[bool]:
        px = max(1, int(ttl_s * 1000))

        def claim() -> list[bool]:
            return [r == 1 for r in self._claim_script(keys=[self.keys.event + i for i in ids], args=[px, *marks])]

        # Unreachable: every event counts as new, so workers keep answering (a redelivery
        # during an outage may be answered twice).
        return self._call("claim_events", claim, [True] * len(ids))

    def release_events(self, ids: Sequence[str]) -> None:
        if ids:
            full = [self.keys.event + i for i in ids]
            self._call("release_events", lambda: self.client.delete(*full), None)

    def marks(self, ids: Sequence[str]) -> list[str | None]:
        if not ids:
            return []
        full = [self.keys.event + i for i in ids]
        missing: list[Reply | None] = [None] * len(ids)
        return _marks(self._call("seen", lambda: self.client.mget(full), missing))

    # ------------------------------------------------------------------ pipeline marker

    def pipeline_marker(self) -> str | None:
        raw: Reply | None = self._call("pipeline_marker", lambda: self.client.get(self.keys.marker), _RAISE)
        return None if raw is None else _text(raw)

    def mark_pipeline(self, value: str, *, replace: bool = False) -> bool:
        return bool(self._call("mark_pipeline", lambda: self.client.set(self.keys.marker, value, nx=not replace), _RAISE))

    # ------------------------------------------------------------------ lifecycle

    def ping(self) -> bool:
        return bool(self._call("ping", self.client.ping, False))

    def close(self) -> None:
        self._closing.set()
        thread = self._sub_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        self.pool.disconnect()
