"""Learning from LLM demonstrations: every cheap tier and every deferral policy.

The same learner runs in-process (``cascade simulate``) and in the Kafka learner worker. For
each demonstration it takes each tier's prediction *before* the tier learns from it, teaches
the tier's policy whether that prediction agreed with the LLM, then teaches the tier the LLM's
label. Gold labels never reach this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cascade.messages import Event, TierOutput
from cascade.routing.stage import Stage


class Learner:
    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)
        self.demonstrations = 0

    def learn(
        self,
        events: Sequence[Event],
        labels: Sequence[str],
        known: Sequence[dict[str, tuple[TierOutput, Any]]] | None = None,
    ) -> None:
        """Learn from (event, LLM label) pairs.

        ``known`` carries, per event, outputs and prepared inputs the stages already computed
        for it at the current model versions, so in-process learning does not redo them.
        """
        if not events:
            return
        known = known if known is not None else [{} for _ in events]
        lower: list[TierOutput | None] = [None] * len(events)
        for stage in self.stages:
            tier = stage.tier
            name = tier.name
            missing = [i for i, k in enumerate(known) if name not in k or k[name][0].version != tier.version]
            inputs: list[Any] = [k[name][1] if name in k else None for k in known]
            outputs: list[TierOutput | None] = [k[name][0] if name in k else None for k in known]
            if missing:
                fresh_inputs = tier.prepare([events[i] for i in missing])
                probs = tier.predict_proba(fresh_inputs)
                feats = stage.policy_features(probs, [lower[i] for i in missing], fresh_inputs)
                for j, i in enumerate(missing):
                    inputs[i] = fresh_inputs[j]
                    outputs[i] = TierOutput(
                        tier=name, version=tier.version, probs=probs[j].tolist(), policy_features=feats[j].tolist()
                    )
            feats = np.array([o.policy_features for o in outputs])  # type: ignore[union-attr]
            predicted = [o.label(tier.labels) for o in outputs]  # type: ignore[union-attr]
            stage.policy.learn(feats, [p == y for p, y in zip(predicted, labels)])
            tier.learn(inputs, labels)
            lower = outputs
        self.demonstrations += len(events)
