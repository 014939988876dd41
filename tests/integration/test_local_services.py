"""devtools.services: real redis-server and Tansu processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis
from kafka import KafkaAdminClient

from devtools.services import (
    RedisHandle,
    ServiceStartError,
    ensure_redis,
    ensure_tansu,
    free_port,
    kafka_answers,
    port_open,
    redis_ping,
    start_tansu,
)
from tests.conftest import TEST_REDIS_URL

pytestmark = pytest.mark.integration


def test_start_redis_stop_and_restart_on_same_port(private_redis: RedisHandle) -> None:
    client = redis.Redis.from_url(private_redis.url, socket_timeout=1)
    assert client.set("k", "v") and client.get("k") == b"v"
    assert ensure_redis(private_redis.url).owned is False  # reused, not started twice

    private_redis.stop()
    assert not private_redis.ping()
    assert not port_open("127.0.0.1", private_redis.port)
    with pytest.raises(redis.ConnectionError):
        client.get("k")

    port = private_redis.port
    private_redis.restart()
    assert private_redis.port == port and private_redis.ping()
    assert client.get("k") is None  # no persistence: a fresh, empty server
    client.close()


def test_redis_fixture_url_answers(redis_url: str) -> None:
    # The session's own db (conftest: db 15 unless CASCADE_TEST_REDIS_URL picks another).
    assert redis_url.rsplit("/", 1)[1] == TEST_REDIS_URL.rsplit("/", 1)[1]
    assert redis_ping(redis_url)


def test_start_tansu_answers_metadata(tmp_path: Path) -> None:
    broker = start_tansu(None, run_dir=tmp_path)
    try:
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers, bootstrap_timeout_ms=5000)
        try:
            admin.create_topics({"t": {"num_partitions": 2, "replication_factor": 1}})
            assert "t" in admin.list_topics()
        finally:
            admin.close()
        assert ensure_tansu(broker.bootstrap_servers).owned is False
        assert broker.log_path is not None and broker.log_path.exists()
    finally:
        broker.stop()
    assert not kafka_answers(broker.bootstrap_servers)


def test_start_tansu_refuses_a_busy_port(kafka_bootstrap: str, tmp_path: Path) -> None:
    port = int(kafka_bootstrap.rsplit(":", 1)[1])
    with pytest.raises(ServiceStartError, match="already in use"):
        start_tansu(port, run_dir=tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devtools.services", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_up_and_down_stop_only_what_up_started(private_redis: RedisHandle, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    kafka_port = free_port()
    # Redis already runs (the private one) so `up` reuses it; Tansu it must start.
    up = _cli("up", "--redis-url", private_redis.url, "--kafka-port", str(kafka_port), "--run-dir", str(run_dir))
    assert up.returncode == 0, up.stderr
    assert f"REDIS_URL={private_redis.url}" in up.stdout
    assert f"KAFKA_BOOTSTRAP=127.0.0.1:{kafka_port}" in up.stdout
    assert (run_dir / "tansu.pid.json").exists() and not (run_dir / "redis.pid.json").exists()
    assert kafka_answers(f"127.0.0.1:{kafka_port}")

    again = _cli("up", "--redis-url", private_redis.url, "--kafka-port", str(kafka_port), "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr
    assert (run_dir / "tansu.pid.json").exists()  # still ours, so `down` still stops it

    down = _cli("down", "--run-dir", str(run_dir))
    assert down.returncode == 0, down.stderr
    assert not port_open("127.0.0.1", kafka_port)
    assert private_redis.ping()  # not started by `up`, so left alone


def test_cli_up_starts_redis_when_none_answers(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    redis_port, kafka_port = free_port(), free_port()
    url = f"redis://127.0.0.1:{redis_port}/0"
    up = _cli("up", "--redis-url", url, "--kafka-port", str(kafka_port), "--run-dir", str(run_dir))
    try:
        assert up.returncode == 0, up.stderr
        assert redis_ping(url) and (run_dir / "redis.pid.json").exists()
    finally:
        down = _cli("down", "--run-dir", str(run_dir))
    assert down.returncode == 0, down.stderr
    assert not port_open("127.0.0.1", redis_port) and not port_open("127.0.0.1", kafka_port)
    assert not list(run_dir.glob("*.pid.json"))
