"""The one configuration model of the whole system.

Loaded from a YAML file (``CASCADE_CONFIG`` or ``--config``) and overridden by
environment variables named ``CASCADE_<SECTION>__<FIELD>`` (for example
``CASCADE_KAFKA__BOOTSTRAP_SERVERS=broker:9092``). Invalid values fail at start
with a message naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_serializer, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict, SettingsError

CONFIG_ENV = "CASCADE_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskConfig(_Section):
    """What is being answered: the label set and where the text lives in an event."""

    name: str = "isear"
    labels: list[str] = Field(
        default_factory=lambda: ["joy", "sadness", "anger", "guilt", "shame", "fear", "disgust"],
        min_length=2,
    )
    text_field: str = Field("text", description="dotted path to the text inside the event JSON")
    id_field: str = Field("id", description="dotted path to the event id inside the event JSON")
    # An LLM answer is mapped onto the label set by case-insensitive match or this alias table.
    label_aliases: dict[str, str] = Field(default_factory=dict)
    # The cost of a cheap answer that misses a label the LLM would have given, per label (default 1).
    # Raising it for a rare class (hate speech) makes tiers defer whenever that class is plausible.
    miss_costs: dict[str, float] = Field(default_factory=dict)
    max_text_chars: int = Field(20_000, gt=0)
    instructions: str = Field(
        "Classify the text into exactly one of the labels.",
        description="task description used by prompting LLM backends",
    )

    @model_validator(mode="after")
    def _labels_unique(self) -> "TaskConfig":
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        unknown = {v for v in self.label_aliases.values() if v not in self.labels} | (
            set(self.miss_costs) - set(self.labels)
        )
        if unknown:
            raise ValueError(f"label_aliases or miss_costs name unknown labels: {sorted(unknown)}")
        if any(c <= 0 for c in self.miss_costs.values()):
            raise ValueError("miss_costs must be positive")
        return self


class FeatureConfig(_Section):
    """Hashed bag of word n-grams shared by the cheap tiers."""

    n_features: int = Field(2**20, gt=0, description="hash space size")
    ngram_max: int = Field(2, ge=1, le=4)
    char_ngrams: tuple[int, int] | None = Field(
        None, description="optional (min, max) character n-gram lengths inside words"
    )
    lowercase: bool = True


class TierConfig(_Section):
    name: str
    kind: Literal["logistic", "onnx"] = "logistic"
    cost: float = Field(1.0, ge=0, description="cost of one call, in the same unit as the LLM's cost")
    # AdaGrad's per-feature step sizes suit sparse text: on ISEAR it imitates the LLM as well
    # from one pass as SGD does with four rehearsals of every demonstration (docs/benchmarks.md).
    optimizer: Literal["adagrad", "sgd"] = "adagrad"
    learning_rate: float = Field(1.0, gt=0)
    l2: float = Field(0.0, ge=0)
    warmup_demonstrations: int | None = Field(None, ge=0, description="overrides deferral.warmup")
    # kind "onnx": a sentence encoder run with onnxruntime, and a softmax head learned online.
    encoder: str = Field("minilm-l6-int8", description="built-in ONNX encoder (cascade/tiers/encoders.py)")
    encoder_path: Path | None = Field(None, description="any ONNX sentence encoder; overrides encoder")
    tokenizer_path: Path | None = Field(None, description="its tokenizer.json; default: the packaged one")
    encoder_output: str | None = Field(None, description="encoder output to use; default: token states, mean-pooled")
    max_length: int = Field(128, gt=0, description="tokens per text")
    batch_size: int = Field(32, gt=0, description="texts per encoder run")
    threads: int = Field(1, gt=0, description="onnxruntime intra-op threads")
    head_learning_rate: float = Field(0.5, gt=0, description="AdaGrad step of the ONNX tier's softmax head")
    head_batch_size: int = Field(16, gt=0, description="demonstrations per head update")
    head_ngrams: int = Field(
        0, ge=0,
        description="hash buckets of the text's word uni- and bigrams that the ONNX head reads "
        "beside the embedding; 0: the embedding only",
    )
    head_ngram_learning_rate: float = Field(0.5, gt=0, description="AdaGrad step of the head's n-gram weights")
    embedding_cache: Path | None = Field(
        None, description="optional .npz of precomputed embeddings (benchmarks); misses are computed"
    )


DEFAULT_MU = 1.0  # the price before this release made it optional


class DeferralConfig(_Section):
    """The learned deferral policy (Nie et al., ICML 2024), shared by every cheap tier."""

    # None: the quality contract (``contract``) prices LLM calls live. A number is an expert's fixed
    # price: setting it (YAML, CASCADE_DEFERRAL__MU or --mu) turns the contract off.
    mu: float | None = Field(
        None,
        ge=0,
        description="fixed price of one LLM call in units of disagreement with the LLM (higher answers more "
        "cheaply); unset: the contract drives",
    )
    warmup: int = Field(200, ge=0, description="demonstrations before a tier may answer at all")
    learning_rate: float = Field(0.3, gt=0)
    exploration_max: float = Field(0.3, ge=0, le=1)
    exploration_min: float = Field(0.02, ge=0, le=1)
    exploration_halflife: int = Field(
        500, gt=0, description="demonstrations after which exploration has decayed halfway to its floor"
    )
    drift_delta: float = Field(0.002, gt=0, lt=1, description="ADWIN confidence on the agreement stream")
    # Per-tier decision thresholds set by a replay sweep override the mu rule when present.
    threshold_overrides: dict[str, float] = Field(default_factory=dict)

    @property
    def fixed_price(self) -> bool:
        """An expert fixed the price (mu or per-tier thresholds): no contract moves it."""
        return self.mu is not None or bool(self.threshold_overrides)

    @property
    def effective_mu(self) -> float:
        """The mu rule's price: the one given, else the rule tiers follow until the contract sets
        their thresholds (a tier whose policy is still cold has none)."""
        return DEFAULT_MU if self.mu is None else self.mu

    @model_validator(mode="after")
    def _exploration_order(self) -> "DeferralConfig":
        if self.exploration_min > self.exploration_max:
            raise ValueError("exploration_min must not exceed exploration_max")
        return self


class ContractConfig(_Section):
    """The quality contract: hold agreement with the LLM (with confidence) or an LLM-call share, live.

    It is on unless ``deferral.mu`` (or ``deferral.threshold_overrides``) is set, which fixes the
    price instead, or both targets are null. A share of the cheap answers (``audit_rate``, drawn
    by a hash of the event id, independent of the policy) is also asked of the LLM to measure
    agreement; ``cascade.contract`` has the estimator and the controller.
    """

    min_agreement: float | None = Field(
        0.95, gt=0, lt=1, description="lower confidence bound on agreement with the LLM to hold; null: none"
    )
    max_llm_fraction: float | None = Field(
        None, ge=0, le=1,
        description="LLM calls (answers and audits) per event at most; with min_agreement, this one wins",
    )
    audit_rate: float = Field(0.03, ge=0, le=1, description="share of cheap answers also asked of the LLM")
    alpha: float = Field(0.05, gt=0, lt=1, description="the bound holds with probability 1 - alpha")
    window_events: int = Field(200_000, ge=2, description="events in the windowed shares")
    window_audits: int = Field(10_000, ge=2, description="audits per tier in the windowed bound")
    update_every: int = Field(100, gt=0, description="events between controller updates")
    # The controller predicts from the risk scores of recent events: the scores fall as the tiers
    # learn, so an older sample over-predicts deferrals (a budget then goes underspent).
    score_window: int = Field(2000, ge=100, description="most recent scored events per tier the controller predicts from")
    audit_salt: str = Field("contract-audit", min_length=1, description="change to draw a fresh audit sample")

    @property
    def targets(self) -> bool:
        return self.min_agreement is not None or self.max_llm_fraction is not None

    @model_validator(mode="after")
    def _audits_for_the_bound(self) -> ContractConfig:
        # Without audits the agreement of cheap answers is unknown, so its bound is 0: the
        # contract could only be held by sending everything to the LLM.
        if self.min_agreement is not None and self.audit_rate == 0:
            raise ValueError("audit_rate must be above 0 when min_agreement is set")
        return self


class LLMConfig(_Section):
    backend: Literal["recorded", "openai"] = "recorded"
    name: str = Field("gpt-3.5-turbo-1106", description="model name; for recorded answers, the key in the event's llm map")
    cost: float = Field(100.0, gt=0, description="cost of one call, same unit as tier costs")
    recorded_path: Path | None = Field(None, description="file with recorded answers (ids → answers)")
    recorded_field: str = Field("llm", description="event field carrying recorded answers")
    max_retries: int = Field(5, ge=0)
    retry_backoff_s: float = Field(0.5, gt=0)
    concurrency: int = Field(8, gt=0)
    # backend "openai": any OpenAI-compatible chat-completions server (OpenAI, vLLM, TGI, Ollama,
    # llama.cpp). The key comes from api_key (env CASCADE_LLM__API_KEY), else the environment
    # variable named by api_key_env, else api_key_file; it is never logged nor written out.
    base_url: str = Field("http://127.0.0.1:8080/v1", description="OpenAI-compatible API root (…/v1)")
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(None, description="name of an environment variable holding the key")
    api_key_file: Path | None = Field(None, description="file holding the key (first line)")
    timeout_s: float = Field(30.0, gt=0, description="per HTTP request (connect and each read)")
    max_tokens: int = Field(32, gt=0, description="completion tokens per answer")
    temperature: float = Field(0.0, ge=0)
    # {instructions}, {labels}, {labels_json}, {task} and {text} are replaced; None = the default.
    system_prompt: str | None = None
    user_prompt: str | None = None
    structured_output: Literal["json_schema", "json_object", "off"] = Field(
        "json_schema",
        description="response_format to ask for: OpenAI json_schema, json_object with a schema "
        "(llama.cpp, vLLM), or none; a server that rejects it is asked with the next one",
    )
    cost_per_1k_prompt_tokens: float = Field(0.0, ge=0, description="with the next: cost from usage instead of `cost`")
    cost_per_1k_completion_tokens: float = Field(0.0, ge=0)
    circuit_failures: int = Field(5, gt=0, description="consecutive failures that open the circuit")
    # A call refused by the open circuit is retried no sooner than it half-opens, so an event waits
    # at most about max_retries × circuit_open_s for the endpoint before it is dead-lettered.
    circuit_open_s: float = Field(30.0, gt=0, description="seconds the open circuit refuses calls")
    max_retry_after_s: float = Field(60.0, ge=0, description="cap on a server's Retry-After")

    @field_serializer("api_key")
    def _no_key_in_dumps(self, key: SecretStr | None) -> None:
        # Dumps (cascade run writes the config for its workers) never carry the key; the
        # workers read it from the environment or api_key_file like their parent.
        return None


class KafkaConfig(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    topic_prefix: str = "cascade."
    partitions: int = Field(4, gt=0)
    replication_factor: int = Field(1, gt=0)
    session_timeout_ms: int = Field(6000, gt=0)
    heartbeat_interval_ms: int = Field(1000, gt=0)
    max_poll_records: int = Field(256, gt=0)
    max_event_bytes: int = Field(100_000, gt=0)

    @model_validator(mode="after")
    def _heartbeat_below_session(self) -> "KafkaConfig":
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be below session_timeout_ms")
        return self


class RedisConfig(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "cascade:"
    socket_timeout_s: float = Field(1.0, gt=0)


class StateConfig(_Section):
    backend: Literal["memory", "redis"] = "memory"
    cache_ttl_s: int = Field(7 * 24 * 3600, gt=0)
    cache_cheap_answers: bool = False
    idempotency_ttl_s: int = Field(7 * 24 * 3600, gt=0)
    registry_keep: int = Field(5, gt=0, description="model versions kept per tier")


class BudgetConfig(_Section):
    calls_per_minute: int | None = Field(None, gt=0)
    calls_per_hour: int | None = Field(None, gt=0)
    calls_per_day: int | None = Field(None, gt=0)
    tokens_per_day: int | None = Field(None, gt=0)
    money_per_day: float | None = Field(None, gt=0)
    on_exhausted: Literal["cheap_tier", "hold"] = "cheap_tier"
    fail_closed: bool = Field(False, description="refuse LLM calls when the budget store is unreachable")


class ServerConfig(_Section):
    metrics_port: int = Field(9100, ge=0, le=65535)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"


def _default_tiers() -> list[TierConfig]:
    return [TierConfig(name="logistic", kind="logistic", cost=1.0)]


class CascadeConfig(BaseModel):
    """The whole configuration. Built directly it takes exactly the values given; only
    ``load_config`` reads a file and the environment."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    seed: int = 0
    task: TaskConfig = Field(default_factory=TaskConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    tiers: list[TierConfig] = Field(default_factory=_default_tiers, min_length=1)
    deferral: DeferralConfig = Field(default_factory=DeferralConfig)
    contract: ContractConfig = Field(default_factory=ContractConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @property
    def contract_on(self) -> bool:
        """The contract drives the thresholds: no fixed price given and a target set."""
        return not self.deferral.fixed_price and self.contract.targets

    @model_validator(mode="after")
    def _tier_names_unique(self) -> "CascadeConfig":
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names) or "llm" in names:
            raise ValueError("tier names must be unique and must not be 'llm'")
        return self


class _Environment(BaseSettings, CascadeConfig):
    """``CASCADE_<SECTION>__<FIELD>`` variables, read by ``load_config`` only."""

    model_config = SettingsConfigDict(env_prefix="CASCADE_", env_nested_delimiter="__", extra="forbid")


def _from_environment() -> dict[str, Any]:
    return EnvSettingsSource(_Environment)()


class ConfigError(Exception):
    """Configuration that cannot start the system; the message names the offending fields."""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {field}: {e['msg']}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, **overrides: Any) -> CascadeConfig:
    """Load the config: YAML (``path`` or ``$CASCADE_CONFIG``), then the environment over it, then
    the explicit ``overrides`` (e.g. command-line flags) over both."""
    path = path or os.environ.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    source = "defaults and environment"
    if path:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    try:
        data = _deep_merge(_deep_merge(data, _from_environment()), overrides)
        return CascadeConfig(**data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from e
    except SettingsError as e:  # an environment value that cannot be parsed (e.g. bad JSON for a list)
        raise ConfigError(f"invalid configuration (environment): {e}") from e


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
