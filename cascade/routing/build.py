"""Building the stages of a cascade from the config (or from tier instances given)."""

from __future__ import annotations

from collections.abc import Sequence

from cascade.config import CascadeConfig
from cascade.deferral.policy import DeferralPolicy
from cascade.messages import LiveParams
from cascade.routing.stage import Stage
from cascade.tiers import registry
from cascade.tiers.base import Tier


def build_tier(config: CascadeConfig, index: int) -> Tier:
    return registry.build_tier(config.tiers[index], config.task.labels, config.features)


def initial_params(config: CascadeConfig) -> LiveParams:
    return LiveParams(mu=config.deferral.effective_mu, thresholds=dict(config.deferral.threshold_overrides))


def stage_of(config: CascadeConfig, tier: Tier, index: int, params: LiveParams | None = None) -> Stage:
    """A tier with its deferral policy; the tier's config entry (same name), if any, sets its warm-up."""
    tc = next((t for t in config.tiers if t.name == tier.name), None)
    warmup = tc.warmup_demonstrations if tc is not None else None
    policy = DeferralPolicy(tier.name, config.deferral, warmup=warmup)
    return Stage(tier, policy, params or initial_params(config), seed=config.seed * 1000 + index,
                 miss_costs=config.task.miss_costs)


def build_stage(config: CascadeConfig, index: int, params: LiveParams | None = None) -> Stage:
    """One configured tier and its policy; a tier worker builds only its own (and needs only its extras)."""
    return stage_of(config, build_tier(config, index), index, params)


def build_stages(config: CascadeConfig, params: LiveParams | None = None, tiers: Sequence[Tier] | None = None) -> list[Stage]:
    """Every stage in cascade order: the configured tiers, or the tier instances given."""
    params = params or initial_params(config)
    if tiers is None:
        return [build_stage(config, i, params) for i in range(len(config.tiers))]
    names = [t.name for t in tiers]
    if len(set(names)) != len(names) or "llm" in names:
        raise ValueError(f"tier names must be unique and must not be 'llm': {names}")
    if any(list(t.labels) != list(config.task.labels) for t in tiers):
        raise ValueError("every tier must predict the task's labels, in the task's order")
    return [stage_of(config, tier, i, params) for i, tier in enumerate(tiers)]
