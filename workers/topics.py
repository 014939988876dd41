"""Topic and consumer-group names, all under the configured prefix."""

from __future__ import annotations

from cascade.config import CascadeConfig


class Topics:
    def __init__(self, config: CascadeConfig) -> None:
        p = config.kafka.topic_prefix
        self.prefix = p
        self.events = f"{p}events"  # the user's events
        self.llm = f"{p}llm"
        self.decisions = f"{p}decisions"  # every answered event, keyed by event id
        self.demonstrations = f"{p}demonstrations"
        self.deadletter = f"{p}deadletter"
        self.tier_names = [t.name for t in config.tiers]
        # One deferral topic per tier boundary: the input of every tier above the first.
        self.deferrals = {name: f"{p}defer.{name}" for name in self.tier_names[1:]}

    def input_of(self, tier: str) -> str:
        if tier == "llm":
            return self.llm
        return self.events if tier == self.tier_names[0] else self.deferrals[tier]

    def above(self, tier: str) -> str:
        """Where a tier's deferrals go: the next tier's topic, or the LLM's after the last."""
        i = self.tier_names.index(tier)
        return self.deferrals[self.tier_names[i + 1]] if i + 1 < len(self.tier_names) else self.llm

    def group(self, role: str) -> str:
        return f"{self.prefix}{role}"

    def all(self) -> list[str]:
        return [self.events, *self.deferrals.values(), self.llm, self.decisions, self.demonstrations, self.deadletter]
