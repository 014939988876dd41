"""Learning each demonstration exactly once across learner restarts, and publishing safely.

A learner's models and its position in the demonstrations topic travel together: every set it
publishes records, per partition, the next offset to learn (``LearnerStep``). On start the
learner restores the current set and skips every demonstration below those offsets, so the
ones learned before a crash are not learned again even when the Kafka commit (which follows
the publish) never happened.

``SetPublisher.publish`` never raises. It publishes on top of the set it loaded or last
published; if the registry moved on (``StaleVersion``: another publisher, or an operator's
rollback) it reloads the current set and carries on from it, so it never overwrites a newer
set with models that lack what that set learned. If the store is unreachable it reports
failure and the caller tries again at its next publish point (and commits nothing meanwhile).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence

from cascade.learning.learner import Learner
from cascade.learning.registry import restore_loaded, stages_models
from cascade.logging import get_logger
from cascade.routing.stage import Stage
from cascade.state.base import StaleVersion, StateUnavailable
from cascade.state.interfaces import ModelRegistry
from cascade.state.records import LearnerStep, LoadedSet, RegistrySet

log = get_logger("cascade.learning.resume")


class LearnerProgress:
    """Per partition of the demonstrations topic, the next offset to learn."""

    def __init__(self, topic: str, step: LearnerStep | None = None) -> None:
        self.topic = topic
        self.offsets: dict[int, int] = {}
        if step is not None:
            self.rebase(step)

    def fresh(self, partition: int, offset: int) -> bool:
        """Whether the record at (partition, offset) is not in the models yet."""
        return offset >= self.offsets.get(partition, 0)

    def advance(self, positions: Iterable[tuple[int, int]]) -> None:
        """The records at these (partition, offset) positions were handled (learned or dead-lettered)."""
        for partition, offset in positions:
            if offset + 1 > self.offsets.get(partition, 0):
                self.offsets[partition] = offset + 1

    def rebase(self, step: LearnerStep) -> bool:
        """Continue from a snapshot's step: per partition the further offset; False (nothing
        taken) when the step is of another topic.

        Offsets never go back: records this learner consumed past a newer set's step are not in
        its consumer's future, and the models are the newer set's (an operator's rollback thus
        rolls the models back, not the stream).
        """
        if step.topic != self.topic:
            log.warning("learner_step_topic_changed", recorded=step.topic, consuming=self.topic)
            return False
        for partition, offset in step.offsets.items():
            self.offsets[partition] = max(offset, self.offsets.get(partition, 0))
        return True

    def step(self, demonstrations: int) -> LearnerStep:
        return LearnerStep(topic=self.topic, offsets=dict(self.offsets), demonstrations=demonstrations)


class SetPublisher:
    """Loads a learner's stages from the registry's current set and publishes them as sets."""

    def __init__(self, registry: ModelRegistry, stages: Sequence[Stage], learner: Learner, progress: LearnerProgress) -> None:
        self.registry = registry
        self.models = stages_models(stages)
        self.learner = learner
        self.progress = progress
        self.epoch = 0  # the registry's epoch and set version this learner's models are based on
        self.version = 0
        self.highest = 0  # the highest version seen: a registry that lost its data is published above it
        self.stale = 0  # times the registry had moved on
        # Names this process's sets: a publish that timed out on the client but was applied is
        # then recognised as its own, and the models (which learned more since) are kept.
        self.token = uuid.uuid4().hex

    def load(self) -> LoadedSet:
        """Restore every model from the current set and continue from its step.

        Raises ``StateUnavailable`` while the store is unreachable: the caller waits, for a
        learner that started afresh would publish untrained models.
        """
        loaded = self.registry.load_set(self.models)
        self._take(loaded)
        return loaded

    def _take(self, loaded: LoadedSet) -> None:
        if loaded.models:
            restored = restore_loaded(self.models, loaded.models)
            log.info("resumed_from_registry", epoch=loaded.epoch, version=loaded.version, **restored)
        step = loaded.set.step if loaded.set is not None else None
        if step is not None and self.progress.rebase(step):
            self.learner.demonstrations = step.demonstrations  # what the restored models learned
        self.epoch, self.version = loaded.epoch, loaded.version
        self.highest = max(self.highest, loaded.version)

    def publish(self) -> RegistrySet | None:
        """Publish every model with the current step as one set; None when not published."""
        blobs = {name: model.snapshot() for name, model in self.models.items()}
        step = self.progress.step(self.learner.demonstrations)
        try:
            for _ in range(2):  # a second try only on top of this process's own late-applied publish
                try:
                    published = self.registry.publish_set(blobs, step, base_epoch=self.epoch, base_version=self.version,
                                                          min_version=self.highest + 1, publisher=self.token)
                except StaleVersion as e:
                    if self._reload(e):
                        continue
                    self.stale += 1
                    return None
                self.epoch, self.version = published.epoch, published.version
                self.highest = max(self.highest, published.version)
                return published
        except StateUnavailable as e:  # publishing or reloading: the next publish point tries again
            log.warning("publish_deferred", error=str(e), demonstrations=self.learner.demonstrations)
        return None

    def _reload(self, stale: StaleVersion) -> bool:
        """Continue from the registry's current set; True when that set is this process's own
        publish (one that timed out on the client but was applied): the models are kept, since
        they include it and more, and the publish is retried on top of it."""
        loaded = self.registry.load_set(self.models)
        if loaded.set is not None and loaded.set.publisher == self.token and loaded.epoch == self.epoch:
            log.warning("own_publish_applied_late", version=loaded.version, based_on=self.version)
            self.version = loaded.version
            self.highest = max(self.highest, loaded.version)
            return True
        if loaded.set is None and not loaded.models:
            # The registry lost its data (Redis restarted empty): these models are the newest there
            # are. Publish them on the empty registry, above every version watchers have seen.
            log.warning("registry_emptied_republishing", based_on=self.version, highest=self.highest)
            self.epoch, self.version = loaded.epoch, loaded.version
            return False
        log.warning("registry_moved_on_reloading", based_on=self.version, epoch=stale.epoch, version=stale.version)
        self._take(loaded)
        return False
