"""The model registry as the engine uses it: the names a stage's models are published under,
loading the newest on start, publishing a stage, and following new versions while serving.

The one place that knows the naming, used by tier workers, the learner and replay alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from cascade.logging import get_logger
from cascade.routing.stage import Stage
from cascade.state.base import StateUnavailable
from cascade.state.interfaces import LiveParameters, ModelRegistry
from cascade.tiers.base import SnapshotError

log = get_logger("cascade.registry")


class _Snapshottable(Protocol):
    version: int

    def snapshot(self) -> bytes: ...

    def restore(self, blob: bytes) -> None: ...


def model_names(tier: str) -> tuple[str, str]:
    """Registry names of a tier's model and of its deferral policy."""
    return f"tier:{tier}", f"policy:{tier}"


def _models(stage: Stage) -> dict[str, _Snapshottable]:
    tier_name, policy_name = model_names(stage.tier.name)
    return {tier_name: stage.tier, policy_name: stage.policy}


def _restore(target: _Snapshottable, name: str, version: int, blob: bytes) -> bool:
    """Restore a fetched snapshot; a blob that fails its checks is refused and the model kept."""
    try:
        target.restore(blob)
    except (SnapshotError, ValueError) as e:
        log.error("snapshot_refused", name=name, version=version, error=str(e))
        return False
    return True


def load_latest(registry: ModelRegistry, stage: Stage) -> dict[str, int]:
    """Restore a stage's tier and policy from their newest registry versions; returns what it loaded."""
    return _load(registry, _models(stage))[0]


def _load(registry: ModelRegistry, models: Mapping[str, _Snapshottable]) -> tuple[dict[str, int], int | None]:
    """Restore from the current versions, read together; (versions restored, the registry's epoch).

    A serving worker starts with fresh models while the registry is unreachable (nothing, None):
    its watcher swaps the published ones in when it comes back.
    """
    try:
        loaded = registry.load_set(models)
    except StateUnavailable:
        log.warning("registry_unreachable_on_load", models=list(models))
        return {}, None
    return restore_loaded(models, loaded.models), loaded.epoch


def stages_models(stages: Sequence[Stage]) -> dict[str, _Snapshottable]:
    """Every model of the stages by registry name: what a learner publishes as one set."""
    return {name: model for stage in stages for name, model in _models(stage).items()}


def restore_loaded(models: Mapping[str, _Snapshottable], found: Mapping[str, tuple[int, bytes]]) -> dict[str, int]:
    """Restore each model from its loaded snapshot (a blob that fails its checks is refused and
    the model kept); returns the versions restored."""
    loaded = {}
    for name, target in models.items():
        if name in found and _restore(target, name, *found[name]):
            loaded[name] = found[name][0]
    return loaded


def latest_snapshots(registry: ModelRegistry, tier: str) -> tuple[tuple[int, bytes] | None, tuple[int, bytes] | None]:
    """The newest (version, bytes) of a tier's model and of its policy, each None if never published."""
    tier_name, policy_name = model_names(tier)
    return registry.fetch(tier_name), registry.fetch(policy_name)


def publish_stage(registry: ModelRegistry, stage: Stage) -> dict[str, int]:
    """Publish a stage's tier and policy at their current versions; returns the versions."""
    out = {}
    for name, model in _models(stage).items():
        registry.publish(name, model.version, model.snapshot())
        out[name] = model.version
    return out


class ModelFollower:
    """Hot-swaps a serving stage's models and live parameters when new ones appear in the state store.

    ``on_swap(name, version)`` is called after each model swapped in, ``on_refused(name, version)``
    for a snapshot that failed its checks (the stage keeps serving the model it has).
    """

    def __init__(
        self, registry: ModelRegistry, params: LiveParameters, stage: Stage, every_s: float = 1.0,
        on_swap: Callable[[str, int], None] | None = None, on_refused: Callable[[str, int], None] | None = None,
    ) -> None:
        self.registry = registry
        self.params = params
        self.stage = stage
        self.models = _models(stage)
        known, epoch = _load(registry, self.models)
        self.watcher = registry.watcher(self.models, poll_interval_s=every_s, known=known, epoch=epoch)
        self.every_s = every_s
        self.on_swap = on_swap
        self.on_refused = on_refused
        self._params_at = 0.0

    def poll(self) -> None:
        for name, version in self.watcher.changed().items():
            found = self.registry.fetch(name, version)
            if found is None:
                continue
            if not _restore(self.models[name], name, *found):
                if self.on_refused is not None:
                    self.on_refused(name, found[0])
                continue
            if self.on_swap is not None:
                self.on_swap(name, found[0])
            log.info("model_swapped", name=name, version=found[0])
        now = time.monotonic()
        if now - self._params_at >= self.every_s:
            self._params_at = now
            params = self.params.get_live_params()
            if params is not None and params != self.stage.params:
                self.stage.params = params
                log.info("live_params_applied", mu=params.mu, thresholds=params.thresholds)
