"""Streaming cascade inference: cheap online tiers that imitate an LLM, with learned deferral.

The engine embeds in a Python program as easily as it runs as Kafka workers::

    from cascade import Cascade, Decision, Event, load_config

See ``Cascade`` for a runnable example. Names load on first use, so ``import cascade.config``
stays light (a tier-1 worker image does not pull in what it does not serve).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Cascade": "cascade.routing.cascade",
    "CascadeStep": "cascade.routing.cascade",
    "CascadeConfig": "cascade.config",
    "ConfigError": "cascade.config",
    "load_config": "cascade.config",
    "Event": "cascade.messages",
    "Decision": "cascade.messages",
    "Deferred": "cascade.messages",
    "Demonstration": "cascade.messages",
    "LiveParams": "cascade.messages",
}
__all__ = [
    "Cascade",
    "CascadeConfig",
    "CascadeStep",
    "ConfigError",
    "Decision",
    "Deferred",
    "Demonstration",
    "Event",
    "LiveParams",
    "load_config",
]

if TYPE_CHECKING:
    from cascade.config import CascadeConfig, ConfigError, load_config
    from cascade.messages import Decision, Deferred, Demonstration, Event, LiveParams
    from cascade.routing.cascade import Cascade, CascadeStep


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cascade' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
