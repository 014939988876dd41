"""Every registered tier kind passes ``check_tier``."""

from collections.abc import Callable, Sequence

import pytest

from cascade.config import FeatureConfig
from cascade.tiers.base import Tier
from cascade.tiers.conformance import MIN_EVENTS, check_tier
from cascade.tiers.registry import build_tier, tier_config_model, tier_kinds
from tests.unit.streams import LLM, easy_and_hard

# Embeddings of a text batched with others differ from its own in float32's last digits.
ATOL = {"onnx": 1e-5}


def maker(kind: str) -> Callable[[Sequence[str]], Tier]:
    if kind == "ensemble":
        # logistic + nblr: conformance without the encoder's cost. A deployed ensemble would
        # usually pair nblr with an onnx member; each member passes check_tier on its own.
        config = tier_config_model(kind)(
            name=kind, kind=kind, members=[{"name": "lr", "kind": "logistic"}, {"name": "nb", "kind": "nblr"}]
        )
    else:
        config = tier_config_model(kind)(name=kind, kind=kind)
    if kind != "onnx":
        return lambda labels: build_tier(config, labels, FeatureConfig())
    from cascade.tiers.onnx import OnnxTier

    encoder = OnnxTier(config, ["a", "b"]).encoder  # loaded once, shared by the tiers the check makes
    return lambda labels: OnnxTier(config, labels, encoder=encoder)


@pytest.mark.parametrize("kind", tier_kinds())
def test_tier_kind_conforms(kind: str) -> None:
    stream = easy_and_hard(MIN_EVENTS, seed=21)
    check_tier(maker(kind), [e for e, _ in stream], [e.payload["llm"][LLM] for e, _ in stream], atol=ATOL.get(kind, 1e-9))


def test_check_tier_catches_a_tier_that_learns_unknown_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Tier, "learn", lambda self, inputs, labels: setattr(self, "version", self.version + len(labels)))
    stream = easy_and_hard(MIN_EVENTS, seed=21)
    with pytest.raises(AssertionError, match="outside its label set"):
        check_tier(maker("logistic"), [e for e, _ in stream], [e.payload["llm"][LLM] for e, _ in stream])
