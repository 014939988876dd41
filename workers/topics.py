"""Topic and consumer-group names: internal ones under the configured prefix; the first tier's
input may be the user's own existing topics (``kafka.input_topics``) or a regex subscription
(``kafka.input_pattern``), and the decisions topic may be named (``kafka.decisions_topic``)."""

from __future__ import annotations

from cascade.config import CascadeConfig


class Topics:
    def __init__(self, config: CascadeConfig) -> None:
        p = config.kafka.topic_prefix
        self.prefix = p
        self.events = f"{p}events"  # the user's events
        self.llm = f"{p}llm"
        kcfg = config.kafka
        self.decisions = kcfg.decisions_topic or f"{p}decisions"  # every answered event, keyed by event id
        # The user's existing topics: read, never created (ensure_topics leaves them alone).
        self.external = list(dict.fromkeys(kcfg.input_topics))
        self.input_pattern = kcfg.input_pattern
        self.inputs = self.external or ([] if self.input_pattern else [self.events])
        self.demonstrations = f"{p}demonstrations"
        self.deadletter = f"{p}deadletter"
        self.tier_names = [t.name for t in config.tiers]
        # One deferral topic per tier boundary: the input of every tier above the first.
        self.deferrals = {name: f"{p}defer.{name}" for name in self.tier_names[1:]}

    def input_of(self, tier: str) -> str:
        """The one input topic of ``tier``; the first tier's first input topic (see :meth:`inputs_of`)."""
        if tier == "llm":
            return self.llm
        if tier == self.tier_names[0]:
            if not self.inputs:
                raise ValueError("the first tier subscribes by pattern (kafka.input_pattern); use inputs_of/pattern_of")
            return self.inputs[0]
        return self.deferrals[tier]

    def inputs_of(self, tier: str) -> list[str]:
        """Every input topic of ``tier`` (empty for the first tier when it subscribes by pattern)."""
        return list(self.inputs) if tier == self.tier_names[0] else [self.input_of(tier)]

    def pattern_of(self, tier: str) -> str | None:
        """The regex subscription of ``tier``, if any (the first tier's ``kafka.input_pattern``)."""
        return self.input_pattern if tier == self.tier_names[0] else None

    def above(self, tier: str) -> str:
        """Where a tier's deferrals go: the next tier's topic, or the LLM's after the last."""
        i = self.tier_names.index(tier)
        return self.deferrals[self.tier_names[i + 1]] if i + 1 < len(self.tier_names) else self.llm

    def group(self, role: str) -> str:
        return f"{self.prefix}{role}"

    def all(self) -> list[str]:
        """The topics this system owns and creates when missing (not the user's input topics)."""
        return [self.events, *self.deferrals.values(), self.llm, self.decisions, self.demonstrations, self.deadletter]
