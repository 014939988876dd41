"""Connection security: the config mapped to kafka-python and redis-py arguments; secrets kept out
of logs and of the config ``cascade run`` writes for its workers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from cascade.config import ConfigError, KafkaConfig, RedisConfig, load_config
from cascade.security import kafka_client_kwargs, redis_client_kwargs, secret_environment
from workers import run

SECRET = "s3cr3t-pa55"


def test_plaintext_kafka_is_just_the_bootstrap():
    assert kafka_client_kwargs(KafkaConfig(bootstrap_servers="b:9092")) == {
        "bootstrap_servers": "b:9092", "security_protocol": "PLAINTEXT"}


def test_sasl_ssl_scram_maps_to_kafka_python_names(tmp_path: Path):
    cfg = KafkaConfig(bootstrap_servers="b:9096", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                      sasl_username="svc", sasl_password=SECRET, ssl_cafile=tmp_path / "ca.pem", ssl_check_hostname=False)
    assert kafka_client_kwargs(cfg) == {
        "bootstrap_servers": "b:9096", "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "svc", "sasl_plain_password": SECRET, "ssl_check_hostname": False,
        "ssl_cafile": str(tmp_path / "ca.pem")}


def test_mutual_tls_and_the_password_file(tmp_path: Path):
    (tmp_path / "pw").write_text(SECRET + "\n")
    ssl = kafka_client_kwargs(KafkaConfig(security_protocol="SSL", ssl_certfile=tmp_path / "c", ssl_keyfile=tmp_path / "k"))
    assert ssl["ssl_certfile"] == str(tmp_path / "c") and ssl["ssl_keyfile"] == str(tmp_path / "k")
    assert "sasl_plain_password" not in ssl
    sasl = KafkaConfig(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u",
                       sasl_password_file=tmp_path / "pw")
    assert kafka_client_kwargs(sasl)["sasl_plain_password"] == SECRET


def test_incomplete_sasl_fails_at_load():
    with pytest.raises(ConfigError, match="sasl_mechanism and sasl_username"):
        load_config(None, kafka={"security_protocol": "SASL_SSL"})
    with pytest.raises(ConfigError, match="sasl_mechanism"):
        load_config(None, kafka={"sasl_mechanism": "PLAIN"})


def test_redis_mapping(tmp_path: Path):
    assert redis_client_kwargs(RedisConfig()) == {}
    tls = RedisConfig(url="rediss://r:6380/0", username="app", password=SECRET, ssl_ca_file=tmp_path / "ca.pem")
    assert redis_client_kwargs(tls) == {"username": "app", "password": SECRET, "ssl_cert_reqs": "required",
                                        "ssl_ca_certs": str(tmp_path / "ca.pem")}
    (tmp_path / "pw").write_text(SECRET)
    assert redis_client_kwargs(RedisConfig(password_file=tmp_path / "pw")) == {"password": SECRET}
    with pytest.raises(ValueError, match="rediss://"):
        RedisConfig(ssl_ca_file=tmp_path / "ca.pem")


def test_password_from_the_environment(monkeypatch):
    monkeypatch.setenv("CASCADE_KAFKA__SASL_PASSWORD", SECRET)
    monkeypatch.setenv("CASCADE_REDIS__PASSWORD", SECRET)
    config = load_config(None, kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "u"})
    assert kafka_client_kwargs(config.kafka)["sasl_plain_password"] == SECRET
    assert redis_client_kwargs(config.redis)["password"] == SECRET


def test_cascade_run_writes_no_secret_and_hands_it_by_environment(tmp_path: Path, monkeypatch, capsys):
    config = load_config(None, kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
                                      "sasl_username": "u", "sasl_password": SECRET},
                         redis={"password": SECRET + "r"}, llm={"api_key": SECRET + "k"})
    assert SECRET not in repr(config) and SECRET not in str(config)
    started: list[dict] = []

    class FakePopen:
        pid = 1

        def __init__(self, cmd, stdout, stderr, env):
            started.append(env)

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    run.start_workers(config, tmp_path, 9300)
    written = (tmp_path / "config.yaml").read_text()
    assert SECRET not in written
    assert yaml.safe_load(written)["kafka"]["sasl_password"] is None
    assert started and all(env["CASCADE_KAFKA__SASL_PASSWORD"] == SECRET and env["CASCADE_REDIS__PASSWORD"] == SECRET + "r"
                           and env["CASCADE_LLM__API_KEY"] == SECRET + "k" for env in started)
    # a worker loading the written config with that environment has the secrets back
    for key, value in secret_environment(config).items():
        monkeypatch.setenv(key, value)
    reloaded = load_config(tmp_path / "config.yaml")
    assert kafka_client_kwargs(reloaded.kafka)["sasl_plain_password"] == SECRET
    assert redis_client_kwargs(reloaded.redis)["password"] == SECRET + "r"
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err


def test_validation_errors_do_not_echo_the_password():
    with pytest.raises(ConfigError) as e:
        load_config(None, kafka={"sasl_password": SECRET, "partitions": -1}, redis={"password": SECRET})
    assert SECRET not in str(e.value)
