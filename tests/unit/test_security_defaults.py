"""Secure defaults: local-only metrics, no secrets in files handed to workers, no stale lag."""

from __future__ import annotations

import math
import os
import threading
import urllib.request
from unittest import mock

import yaml

from cascade.config import load_config
from workers.observability import HealthServer, LagSampler, WorkerMetrics
from workers.run import write_worker_config


def test_metrics_and_probes_bind_to_localhost_by_default():
    config = load_config(None)
    assert config.server.metrics_host == "127.0.0.1"
    server = HealthServer(WorkerMetrics("sec-test"), 0, host=config.server.metrics_host)
    try:
        assert server.httpd.server_address[0] == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.status == 200
    finally:
        server.close()


def test_the_config_written_for_the_workers_holds_no_password(tmp_path):
    config = load_config(None, redis={"url": "redis://cascade:s3cr3t-pw@redis.internal:6380/2"},
                         llm={"api_key": "sk-very-secret"})
    path, env = write_worker_config(config, tmp_path)
    text = path.read_text()
    assert "s3cr3t-pw" not in text and "sk-very-secret" not in text
    assert yaml.safe_load(text)["redis"]["url"] == "redis://redis.internal:6380/2"
    assert env == {"CASCADE_REDIS__URL": "redis://cascade:s3cr3t-pw@redis.internal:6380/2",
                   "CASCADE_LLM__API_KEY": "sk-very-secret"}
    # What a worker loads (the file, then its environment) is the config it was given.
    with mock.patch.dict(os.environ, env):
        loaded = load_config(path)
    assert loaded.redis.url == config.redis.url and loaded.llm.api_key.get_secret_value() == "sk-very-secret"
    plain, env = write_worker_config(load_config(None), tmp_path / "plain")
    assert env == {} and yaml.safe_load(plain.read_text())["redis"]["url"] == "redis://127.0.0.1:6379/0"


def test_the_lag_gauge_is_cleared_when_its_probe_fails():
    metrics = WorkerMetrics("lag-test")
    metrics.lag.labels("lag-test").set(42)

    class Failing:
        def lag(self, group, topics):
            raise ConnectionError("broker gone")

        def close(self):
            pass

    sampler = LagSampler.__new__(LagSampler)
    sampler.metrics, sampler.group, sampler.topics, sampler.every_s = metrics, "g", ["t"], 0.01
    sampler._probe = Failing()
    sampler._stop = threading.Event()
    sampler._stop.set()  # one pass of the loop
    sampler._run()
    assert math.isnan(metrics.lag.labels("lag-test")._value.get())
