import pytest

from cascade.config import ConfigError, load_config


def test_yaml_then_environment_overrides(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("kafka:\n  partitions: 3\n  topic_prefix: demo.\ndeferral:\n  mu: 0.4\n")
    monkeypatch.setenv("CASCADE_KAFKA__PARTITIONS", "6")
    config = load_config(path)
    assert config.kafka.partitions == 6  # the environment wins over the file
    assert config.kafka.topic_prefix == "demo."
    assert config.deferral.mu == 0.4


def test_config_path_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 7\n")
    monkeypatch.setenv("CASCADE_CONFIG", str(path))
    assert load_config().seed == 7


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("deferral:\n  mu: -1\n", "deferral.mu"),
        ("kafka:\n  partitions: zero\n", "kafka.partitions"),
        ("kafka:\n  bootstrap: x\n", "kafka.bootstrap"),  # unknown keys are errors, not ignored
        ("task:\n  labels: [a, a]\n", "task"),
        ("deferral:\n  exploration_min: 0.5\n  exploration_max: 0.1\n", "deferral"),
        ("tiers:\n  - name: llm\n", "<root>"),
        ("contract:\n  min_agreement: 1.5\n", "contract.min_agreement"),
        ("contract:\n  max_llm_fraction: -0.1\n", "contract.max_llm_fraction"),
        ("contract:\n  audit_rate: 2\n", "contract.audit_rate"),
        ("contract:\n  alpha: 0\n", "contract.alpha"),
        ("contract:\n  min_agreement_typo: 0.9\n", "contract.min_agreement_typo"),
    ],
)
def test_invalid_config_names_the_field(tmp_path, yaml_text, field):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"  {field}" in str(err.value)


def test_invalid_environment_value_names_the_field(monkeypatch):
    monkeypatch.setenv("CASCADE_DEFERRAL__WARMUP", "-5")
    with pytest.raises(ConfigError, match="deferral.warmup"):
        load_config()


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_tiers_validate_by_kind_and_dump_every_kinds_fields():
    from cascade.config import CascadeConfig, LogisticTierConfig, OnnxTierConfig

    config = CascadeConfig(tiers=[{"name": "lr", "l2": 0.1}, {"name": "enc", "kind": "onnx", "threads": 2}])
    assert [type(t) for t in config.tiers] == [LogisticTierConfig, OnnxTierConfig]  # kind "logistic" by default
    dumped = config.model_dump()
    assert dumped["tiers"][0]["l2"] == 0.1 and dumped["tiers"][1]["threads"] == 2
    assert CascadeConfig(**dumped) == config
    assert CascadeConfig.model_validate_json(config.model_dump_json()) == config


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("tiers:\n  - name: lr\n    encoder: minilm-l6-int8\n", "tiers.0.encoder"),  # an ONNX field
        ("tiers:\n  - name: enc\n    kind: onnx\n    optimizer: sgd\n", "tiers.0.optimizer"),
        ("tiers:\n  - name: x\n    kind: forest\n", "tiers.0.kind"),
        ("llm:\n  backend: telepathy\n", "llm.backend"),
    ],
)
def test_a_field_of_another_kind_or_an_unknown_kind_is_named(tmp_path, yaml_text, field):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"  {field}:" in str(err.value)


def test_a_registered_kind_validates_and_builds(monkeypatch):
    from typing import Literal

    from cascade.config import CascadeConfig, FeatureConfig, TierConfig
    from cascade.routing.build import build_tier
    from cascade.tiers import registry
    from cascade.tiers.llm import RecordedAnswers, make_backend

    class ConstantConfig(TierConfig):
        kind: Literal["constant"] = "constant"
        label: str

    built = []

    def make(config: ConstantConfig, labels: list[str], features: FeatureConfig) -> object:
        built.append((config.label, labels))
        return built

    monkeypatch.setattr(registry, "_TIERS", dict(registry._TIERS))
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))
    registry.register_tier("constant", ConstantConfig, make)
    with pytest.raises(ValueError, match="registered already"):
        registry.register_tier("constant", ConstantConfig, make)
    registry.register_backend("echo", RecordedAnswers)
    assert registry.tier_kinds() == ("logistic", "onnx", "nblr", "ensemble", "constant")
    config = CascadeConfig(task={"labels": ["a", "b"]}, llm={"backend": "echo"},
                           tiers=[{"name": "c", "kind": "constant", "label": "a"}])
    assert build_tier(config, 0) is built and built == [("a", ["a", "b"])]
    assert CascadeConfig(**config.model_dump()).tiers[0] == ConstantConfig(name="c", label="a")
    from cascade.task import Task

    assert isinstance(make_backend(Task(config.task), config.llm), RecordedAnswers)
    with pytest.raises(ValueError, match=r"tiers\.0\.label"):
        CascadeConfig(tiers=[{"name": "c", "kind": "constant"}])  # label is required


def test_an_onnx_config_validates_without_the_onnx_tier(monkeypatch):
    import sys

    from cascade.config import CascadeConfig

    monkeypatch.setitem(sys.modules, "cascade.tiers.onnx", None)  # importing it would fail
    config = CascadeConfig(tiers=[{"name": "enc", "kind": "onnx"}])
    assert config.tiers[0].kind == "onnx"


def test_contract_error_across_fields_names_the_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("contract:\n  audit_rate: 0\n")  # the default min_agreement needs audits
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "  contract:" in str(err.value) and "audit_rate" in str(err.value)


def test_the_contract_is_the_default_and_a_fixed_price_turns_it_off(tmp_path):
    config = load_config(None)
    assert config.contract_on and config.contract.min_agreement == 0.95 and config.deferral.mu is None
    assert config.deferral.effective_mu == 1.0  # the rule of tiers the contract has not priced yet
    assert not load_config(None, deferral={"mu": 0.3}).contract_on
    assert not load_config(None, deferral={"threshold_overrides": {"logistic": 0.2}}).contract_on
    assert not load_config(None, contract={"min_agreement": None}).contract_on
    path = tmp_path / "old.yaml"  # a config written before the contract still loads, as a fixed price
    path.write_text("deferral:\n  mu: 0.5\n")
    assert not load_config(path).contract_on
