from pathlib import Path

from cascade.config import load_config


def test_example_config_loads():
    config = load_config(Path(__file__).resolve().parents[2] / "deploy" / "config.example.yaml")
    assert config.task.miss_costs == {"hate": 3.0}
    assert config.state.backend == "redis"
