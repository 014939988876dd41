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
