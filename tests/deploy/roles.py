"""The real worker object a container would run, built without Kafka (memory state, a free
metrics port): its consumer group and input topics, and whether its image can build it."""

from __future__ import annotations

from typing import Any

from cascade.config import CascadeConfig
from workers.cli import build_parser


def worker_for(args: list[str], config: CascadeConfig) -> Any:
    """Construct the worker ``cascade <args>`` would run; the caller closes ``worker.health``."""
    parsed = build_parser().parse_args(args)
    config = config.model_copy(update={"state": config.state.model_copy(update={"backend": "memory"})})
    if parsed.command == "learner":
        from workers.learner_worker import LearnerWorker

        return LearnerWorker(config, metrics_port=0)
    if parsed.command != "worker":
        raise ValueError(f"not a worker command: {args}")
    if parsed.tier == "llm":
        from workers.llm_worker import LLMWorker

        return LLMWorker(config, metrics_port=0)
    from workers.tier_worker import TierWorker

    return TierWorker(config, parsed.tier, metrics_port=0)
