"""Shared fixtures: real Redis and a real Kafka-protocol broker (Tansu) over TCP.

A fixture whose service cannot be found or started raises, so the tests that need it
error out loudly instead of being skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from devtools.services import BrokerHandle, RedisHandle, ensure_redis, start_redis, start_tansu

# db 15 keeps test keys away from a developer's data in db 0 of a shared local Redis; test
# sessions run side by side on one machine each set their own db (the fixture flushes it).
TEST_REDIS_URL = os.environ.get("CASCADE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def services_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def redis_url(services_run_dir: Path) -> Iterator[str]:
    """URL of a Redis on 127.0.0.1:6379, db 15 flushed; reused if running, else started."""
    handle = ensure_redis(TEST_REDIS_URL, run_dir=services_run_dir)
    client = redis.Redis.from_url(handle.url)
    client.flushdb()
    client.close()
    yield handle.url
    handle.stop()  # no-op unless this session started it


@pytest.fixture(scope="session")
def kafka_broker(services_run_dir: Path) -> Iterator[BrokerHandle]:
    """A Tansu broker private to this test session, on a free port."""
    handle = start_tansu(None, run_dir=services_run_dir)
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: BrokerHandle) -> str:
    return kafka_broker.bootstrap_servers


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisHandle]:
    """A Redis only this test uses (free port), which it may stop and restart."""
    handle = start_redis(run_dir=tmp_path)
    yield handle
    handle.stop()
