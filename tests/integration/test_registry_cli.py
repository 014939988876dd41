"""`cascade registry list|rollback` against a real Redis."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
import yaml

from cascade.config import CascadeConfig, load_config
from cascade.state import LearnerStep, StateStore, make_state
from workers import cli

pytestmark = pytest.mark.integration
TIER, POLICY = "tier:logistic", "policy:logistic"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """cli.main configures structlog to print to the (captured) stderr of the moment: undo it after."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def config_file(tmp_path: Path, redis_url: str) -> Path:
    prefix = f"cli{uuid.uuid4().hex[:8]}."
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump({"task": {"labels": ["fear", "joy"]}, "state": {"backend": "redis"},
                                    "redis": {"url": redis_url, "key_prefix": prefix},
                                    "kafka": {"topic_prefix": prefix}}))
    return path


def publish_three(store: StateStore) -> None:
    for v in range(3):
        step = LearnerStep(topic="d", offsets={0: 10 * (v + 1), 1: 5 * (v + 1)}, demonstrations=15 * (v + 1))
        store.publish_set({TIER: f"t{v}".encode(), POLICY: f"p{v}".encode()}, step, base_epoch=0, base_version=v)


def test_list_and_rollback(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config: CascadeConfig = load_config(config_file)
    store = make_state(config)
    try:
        publish_three(store)
        capsys.readouterr()  # the publishes' log lines
        assert cli.main(["--config", str(config_file), "registry", "list", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert (listed["epoch"], listed["current"]) == (0, 3)
        assert [(s["version"], s["demonstrations"], s["offsets"]) for s in listed["sets"]] == [
            (1, 15, {"0": 10, "1": 5}), (2, 30, {"0": 20, "1": 10}), (3, 45, {"0": 30, "1": 15})]
        assert cli.main(["--config", str(config_file), "registry", "rollback"]) == 0
        assert "rolled back to set 2 (epoch 1)" in capsys.readouterr().out
        assert (store.load_set([TIER]).epoch, store.load_set([TIER]).models[TIER]) == (1, (2, b"t1"))
        assert cli.main(["--config", str(config_file), "registry", "rollback", "--to", "3"]) == 0
        assert store.load_set([POLICY]).models[POLICY] == (3, b"p2") and store.load_set([]).epoch == 2
        capsys.readouterr()
        assert cli.main(["--config", str(config_file), "registry", "rollback", "--to", "99"]) == 1
        assert "set 99 is not kept" in capsys.readouterr().err
        assert cli.main(["--config", str(config_file), "registry", "list"]) == 0
        text = capsys.readouterr().out
        assert "epoch 2, current set 3" in text and "*        3" in text and "0:30,1:15" in text
    finally:
        store.close()


def test_the_in_process_registry_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "memory.yaml"
    path.write_text(yaml.safe_dump({"task": {"labels": ["fear", "joy"]}}))
    assert cli.main(["--config", str(path), "registry", "list"]) == 2
    assert "state.backend: redis" in capsys.readouterr().err
