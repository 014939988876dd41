"""Connection security in one place: the configuration mapped to kafka-python's and redis-py's
client arguments, and the secrets ``cascade run`` hands its workers by environment.

Every Kafka client the system creates takes :func:`kafka_client_kwargs`; every Redis client takes
:func:`redis_client_kwargs`. Secrets are ``SecretStr`` in the configuration, dropped from its
dumps, and only unwrapped here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cascade.config import CascadeConfig, ConfigError, KafkaConfig, RedisConfig


def _secret_from_file(path: Path, what: str) -> str:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read {what} file {path}: {e.strerror}") from None
    return lines[0].strip() if lines else ""


def kafka_password(cfg: KafkaConfig) -> str | None:
    if cfg.sasl_password is not None:
        return cfg.sasl_password.get_secret_value()
    if cfg.sasl_password_file is not None:
        return _secret_from_file(cfg.sasl_password_file, "kafka.sasl_password")
    return None


def redis_password(cfg: RedisConfig) -> str | None:
    if cfg.password is not None:
        return cfg.password.get_secret_value()
    if cfg.password_file is not None:
        return _secret_from_file(cfg.password_file, "redis.password")
    return None


def kafka_client_kwargs(cfg: KafkaConfig) -> dict[str, Any]:
    """``bootstrap_servers`` and the security arguments of a KafkaConsumer, KafkaProducer or
    KafkaAdminClient (kafka-python names; SCRAM takes the sasl_plain_* pair too)."""
    out: dict[str, Any] = {"bootstrap_servers": cfg.bootstrap_servers, "security_protocol": cfg.security_protocol}
    if cfg.security_protocol.startswith("SASL_"):
        out["sasl_mechanism"] = cfg.sasl_mechanism
        out["sasl_plain_username"] = cfg.sasl_username
        out["sasl_plain_password"] = kafka_password(cfg)
    if cfg.security_protocol in ("SSL", "SASL_SSL"):
        out["ssl_check_hostname"] = cfg.ssl_check_hostname
        for key, path in (("ssl_cafile", cfg.ssl_cafile), ("ssl_certfile", cfg.ssl_certfile),
                          ("ssl_keyfile", cfg.ssl_keyfile)):
            if path is not None:
                out[key] = str(path)
    return out


def redis_client_kwargs(cfg: RedisConfig) -> dict[str, Any]:
    """Keyword arguments for redis-py's ``Redis.from_url(cfg.url, **kwargs)`` (or ``ConnectionPool.from_url``):
    the ACL user and password and, for rediss://, the CA to verify the server with."""
    out: dict[str, Any] = {}
    if cfg.username:
        out["username"] = cfg.username
    password = redis_password(cfg)
    if password is not None:
        out["password"] = password
    if cfg.url.startswith("rediss://"):
        out["ssl_cert_reqs"] = "required"
        if cfg.ssl_ca_file is not None:
            out["ssl_ca_certs"] = str(cfg.ssl_ca_file)
    return out


def secret_environment(config: CascadeConfig) -> dict[str, str]:
    """The secrets a config carries in memory (not in files), as the ``CASCADE_*`` variables that
    give them to a child process loading the dumped config (which omits them)."""
    env: dict[str, str] = {}
    if config.kafka.sasl_password is not None:
        env["CASCADE_KAFKA__SASL_PASSWORD"] = config.kafka.sasl_password.get_secret_value()
    if config.redis.password is not None:
        env["CASCADE_REDIS__PASSWORD"] = config.redis.password.get_secret_value()
    if config.llm.api_key is not None:
        env["CASCADE_LLM__API_KEY"] = config.llm.api_key.get_secret_value()
    return env
