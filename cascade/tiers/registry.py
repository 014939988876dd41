"""The kinds of cheap tier and of LLM backend, by name: the built-in ones and any a user registers.

A tier kind is its config model (a ``TierConfig`` subclass, which ``CascadeConfig.tiers``
validates an entry of that kind with) and a factory that builds the tier. Factories import their
implementation only when called: the ONNX tier's module needs onnxruntime, onnx and tokenizers,
which a tier-1-only image lacks, yet that image must still validate a config naming an ONNX tier.
This module itself imports nothing heavy, for the same reason.

A user's own kind::

    class MyTierConfig(TierConfig):
        kind: Literal["mine"] = "mine"
        depth: int = 3

    register_tier("mine", MyTierConfig, lambda config, labels, features: MyTier(config, labels))

Register before the config is loaded; ``cascade.tiers.conformance.check_tier`` checks the tier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from cascade.config import (
    EnsembleTierConfig,
    FeatureConfig,
    LLMConfig,
    LogisticTierConfig,
    NblrTierConfig,
    OnnxTierConfig,
    TierConfig,
)

if TYPE_CHECKING:
    from cascade.task import Task
    from cascade.tiers.base import Tier
    from cascade.tiers.llm import LLMBackend

C = TypeVar("C", bound=TierConfig)
BackendFactory = Callable[["Task", LLMConfig], "LLMBackend"]


class _TierKind(NamedTuple):
    config_model: type[TierConfig]
    factory: Callable[..., Tier]  # (its config model, labels, features) -> Tier


_TIERS: dict[str, _TierKind] = {}
_BACKENDS: dict[str, BackendFactory] = {}


def register_tier(
    kind: str, config_model: type[C], factory: Callable[[C, Sequence[str], FeatureConfig], Tier]
) -> None:
    """Make ``kind`` a tier kind: entries of that kind validate with ``config_model``, and
    ``factory(config, labels, features)`` builds the tier. A kind is registered once."""
    if kind in _TIERS:
        raise ValueError(f"tier kind {kind!r} is registered already")
    if not (isinstance(config_model, type) and issubclass(config_model, TierConfig)):
        raise TypeError(f"the config model of tier kind {kind!r} must subclass TierConfig")
    _TIERS[kind] = _TierKind(config_model, factory)


def tier_kinds() -> tuple[str, ...]:
    """The registered tier kinds, in registration order (the built-in ones first)."""
    return tuple(_TIERS)


def tier_config_model(kind: str) -> type[TierConfig]:
    """The config model of ``kind``; ValueError for a kind nobody registered."""
    try:
        return _TIERS[kind].config_model
    except KeyError:
        raise ValueError(f"unknown tier kind {kind!r}; registered: {', '.join(_TIERS)}") from None


def build_tier(config: TierConfig, labels: Sequence[str], features: FeatureConfig) -> Tier:
    """A new tier of ``config.kind`` over ``labels``; ``features`` is the shared n-gram hashing."""
    model = tier_config_model(config.kind)
    if not isinstance(config, model):
        raise TypeError(f"tier {config.name!r} of kind {config.kind!r} needs a {model.__name__}, "
                        f"not a {type(config).__name__}")
    return _TIERS[config.kind].factory(config, labels, features)


def register_backend(kind: str, factory: BackendFactory) -> None:
    """Make ``kind`` a value of ``llm.backend``: ``factory(task, llm_config)`` builds the backend."""
    if kind in _BACKENDS:
        raise ValueError(f"LLM backend {kind!r} is registered already")
    _BACKENDS[kind] = factory


def backend_kinds() -> tuple[str, ...]:
    """The registered LLM backends, in registration order (the built-in ones first)."""
    return tuple(_BACKENDS)


def build_backend(task: Task, config: LLMConfig) -> LLMBackend:
    """A new LLM backend of ``config.backend``."""
    try:
        factory = _BACKENDS[config.backend]
    except KeyError:
        raise ValueError(f"unknown LLM backend {config.backend!r}; registered: {', '.join(_BACKENDS)}") from None
    return factory(task, config)


# The built-in kinds. Each factory imports its implementation when first called.


def _logistic(config: LogisticTierConfig, labels: Sequence[str], features: FeatureConfig) -> Tier:
    from cascade.tiers.logistic import LogisticTier

    return LogisticTier(config, labels, features)


def _nblr(config: NblrTierConfig, labels: Sequence[str], features: FeatureConfig) -> Tier:
    from cascade.tiers.nblr import NblrTier

    return NblrTier(config.name, labels, config.cost, features, learning_rate=config.learning_rate,
                    alpha=config.alpha, nb_scaling=config.nb_scaling)


def _onnx(config: OnnxTierConfig, labels: Sequence[str], features: FeatureConfig) -> Tier:
    from cascade.tiers.onnx import OnnxTier

    return OnnxTier(config, labels)


def _ensemble(config: EnsembleTierConfig, labels: Sequence[str], features: FeatureConfig) -> Tier:
    from cascade.tiers.ensemble import EnsembleTier

    return EnsembleTier(config.name, labels, config.cost, [build_tier(m, labels, features) for m in config.members])


def _recorded(task: Task, config: LLMConfig) -> LLMBackend:
    from cascade.tiers.llm import RecordedAnswers

    return RecordedAnswers(task, config)


def _openai(task: Task, config: LLMConfig) -> LLMBackend:
    from cascade.tiers.openai_compat import OpenAIBackend

    return OpenAIBackend(task, config)


register_tier("logistic", LogisticTierConfig, _logistic)
register_tier("onnx", OnnxTierConfig, _onnx)
register_tier("nblr", NblrTierConfig, _nblr)
register_tier("ensemble", EnsembleTierConfig, _ensemble)
register_backend("recorded", _recorded)
register_backend("openai", _openai)
