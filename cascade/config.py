"""The one configuration model of the whole system.

Loaded from a YAML file (``CASCADE_CONFIG`` or ``--config``) and overridden by
environment variables named ``CASCADE_<SECTION>__<FIELD>`` (for example
``CASCADE_KAFKA__BOOTSTRAP_SERVERS=broker:9092``). Invalid values fail at start
with a message naming the field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    SerializeAsAny,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
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
    def _labels_unique(self) -> TaskConfig:
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
    """What every cheap tier has; each kind's own fields are in its model (``tier_config_model``)."""

    name: str
    kind: str = "logistic"
    cost: float = Field(1.0, ge=0, description="cost of one call, in the same unit as the LLM's cost")
    warmup_demonstrations: int | None = Field(None, ge=0, description="overrides deferral.warmup")


class LogisticTierConfig(TierConfig):
    """Kind "logistic": online softmax regression over the hashed n-grams of ``features``."""

    kind: Literal["logistic"] = "logistic"
    # AdaGrad's per-feature step sizes suit sparse text: on ISEAR it imitates the LLM as well
    # from one pass as SGD does with four rehearsals of every demonstration (docs/benchmarks.md).
    optimizer: Literal["adagrad", "sgd"] = "adagrad"
    learning_rate: float = Field(1.0, gt=0)
    l2: float = Field(0.0, ge=0)


class NblrTierConfig(TierConfig):
    """Kind "nblr": NB-weighted logistic (NBSVM-style) over the hashed n-grams of ``features``,
    learning and scoring in numpy (cascade/tiers/nblr.py)."""

    kind: Literal["nblr"] = "nblr"
    learning_rate: float = Field(0.5, gt=0, description="AdaGrad step of the softmax head")
    alpha: float = Field(1.0, gt=0, description="Laplace smoothing of the naive-Bayes counts")
    nb_scaling: bool = Field(True, description="false: plain softmax regression in numpy")


class OnnxTierConfig(TierConfig):
    """Kind "onnx": a sentence encoder run with onnxruntime, and a softmax head learned online."""

    kind: Literal["onnx"] = "onnx"
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
    l2: float = Field(0.0, ge=0, description="L2 penalty on the head's embedding weights")
    embedding_cache: Path | None = Field(
        None, description="optional .npz of precomputed embeddings (benchmarks); misses are computed"
    )


def _tier_config_by_kind(value: Any) -> TierConfig:
    """A tier entry validated by the model its ``kind`` registered (cascade/tiers/registry.py),
    so that a user's own kind validates too and a field of another kind is named as unknown."""
    from cascade.tiers.registry import tier_config_model

    if isinstance(value, TierConfig):
        value = value.model_dump()
    kind = value.get("kind", "logistic") if isinstance(value, dict) else "logistic"
    try:
        model = tier_config_model(str(kind))
    except ValueError as e:
        raise ValidationError.from_exception_data(
            "TierConfig", [InitErrorDetails(type=PydanticCustomError("tier_kind", str(e)), loc=("kind",), input=kind)]
        ) from None
    return model.model_validate(value)


# SerializeAsAny: dumps carry each kind's own fields, not only the base's.
AnyTierConfig = Annotated[SerializeAsAny[TierConfig], PlainValidator(_tier_config_by_kind)]


class EnsembleTierConfig(TierConfig):
    """Kind "ensemble": the mean of its members' probabilities, each member learning on its own
    (cascade/tiers/ensemble.py). Members validate by their kind, as ``CascadeConfig.tiers`` do;
    their ``cost`` and ``warmup_demonstrations`` are unused (the ensemble's own count)."""

    kind: Literal["ensemble"] = "ensemble"
    members: list[AnyTierConfig] = Field(..., min_length=2, description="the tiers averaged, e.g. nblr and onnx")

    @model_validator(mode="after")
    def _member_names_unique(self) -> EnsembleTierConfig:
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"ensemble {self.name!r} has member names repeated: {names}")
        return self


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
    def _exploration_order(self) -> DeferralConfig:
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
    backend: str = Field("recorded", description="a registered LLM backend: recorded, openai, or one's own")
    name: str = Field("gpt-3.5-turbo-1106", description="model name; for recorded answers, the key in the event's llm map")
    cost: float = Field(100.0, gt=0, description="cost of one call, same unit as tier costs")
    recorded_path: Path | None = Field(None, description="file with recorded answers (ids → answers)")
    recorded_field: str = Field("llm", description="event field carrying recorded answers")
    max_retries: int = Field(5, ge=0)
    retry_backoff_s: float = Field(0.5, gt=0)
    concurrency: int = Field(8, gt=0)
    # How the LLM worker feeds its slots: "continuous" starts a call whenever a slot frees and
    # commits per-partition watermarks (workers/dispatch.py); "batch" waits for a whole polled
    # batch (the old barrier, kept as the comparison baseline).
    dispatch: Literal["continuous", "batch"] = "continuous"
    window: int = Field(512, gt=0, description="continuous: admitted records (queued + in flight) before pausing")
    partition_window: int = Field(256, gt=0, description="continuous: offsets past a partition's watermark before pausing it")
    commit_interval_s: float = Field(1.0, gt=0, description="continuous: seconds between watermark commits")
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

    @field_validator("backend")
    @classmethod
    def _backend_registered(cls, backend: str) -> str:
        from cascade.tiers.registry import backend_kinds

        if backend not in backend_kinds():
            raise ValueError(f"unknown LLM backend {backend!r}; registered: {', '.join(backend_kinds())}")
        return backend

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
    # A broker outage (timeouts, lost connections, a fenced producer) is waited out this long, not
    # ready meanwhile; then the worker exits with code 3 for its supervisor to restart it.
    outage_timeout_s: float = Field(300.0, gt=0, description="how long a worker waits out a broker outage")
    # Attaching to a real stream: the first tier reads these existing topics (or every topic the
    # pattern matches) instead of {topic_prefix}events; they are never created by the system.
    input_topics: list[str] = Field(
        default_factory=list, description="existing topics the first tier reads; empty: {topic_prefix}events"
    )
    input_pattern: str | None = Field(None, description="regex subscription for the first tier's input")
    decisions_topic: str | None = Field(None, description="where decisions go; default {topic_prefix}decisions")
    # Security of every Kafka client the system creates (cascade/security.py kafka_client_kwargs).
    # The password comes from sasl_password (env CASCADE_KAFKA__SASL_PASSWORD) or sasl_password_file;
    # it is never logged nor written out.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = Field(None, description="file holding the SASL password (first line)")
    ssl_cafile: Path | None = Field(None, description="CA bundle that signed the brokers' certificates")
    ssl_certfile: Path | None = Field(None, description="client certificate (mutual TLS)")
    ssl_keyfile: Path | None = Field(None, description="client certificate's private key (mutual TLS)")
    ssl_check_hostname: bool = True

    @model_validator(mode="after")
    def _heartbeat_below_session(self) -> KafkaConfig:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be below session_timeout_ms")
        return self

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism is None or not self.sasl_username:
                raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism and sasl_username")
        elif self.sasl_mechanism is not None:
            raise ValueError("sasl_mechanism is set but security_protocol is not SASL_PLAINTEXT or SASL_SSL")
        return self

    @field_serializer("sasl_password")
    def _no_password_in_dumps(self, password: SecretStr | None) -> None:
        return None  # cascade run passes it to its workers by environment

    @model_validator(mode="after")
    def _one_input_kind(self) -> KafkaConfig:
        if self.input_topics and self.input_pattern:
            raise ValueError("set input_topics or input_pattern, not both")
        if self.input_pattern is not None:
            try:
                re.compile(self.input_pattern)
            except re.error as e:
                raise ValueError(f"input_pattern is not a valid regex: {e}") from None
        return self


class RedisConfig(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "cascade:"
    socket_timeout_s: float = Field(1.0, gt=0)
    # TLS: a rediss:// url; ssl_ca_file names the CA when it is not in the system store.
    # ACL: username and password (env CASCADE_REDIS__PASSWORD, or password_file); a password
    # inside the url works too but is better kept out of files. Never logged nor written out.
    ssl_ca_file: Path | None = Field(None, description="CA bundle for a rediss:// server")
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(None, description="file holding the Redis password (first line)")

    @model_validator(mode="after")
    def _tls_url(self) -> RedisConfig:
        if self.ssl_ca_file is not None and not self.url.startswith("rediss://"):
            raise ValueError("ssl_ca_file needs a rediss:// url")
        return self

    @field_serializer("password")
    def _no_password_in_dumps(self, password: SecretStr | None) -> None:
        return None  # cascade run passes it to its workers by environment


class StateConfig(_Section):
    backend: Literal["memory", "redis"] = "memory"
    cache_ttl_s: int = Field(7 * 24 * 3600, gt=0)
    cache_cheap_answers: bool = False
    idempotency_ttl_s: int = Field(7 * 24 * 3600, gt=0)
    registry_keep: int = Field(5, gt=0, description="model versions kept per tier")
    # Redis found emptied (its pipeline marker gone while offsets are committed): idempotency records
    # and budget counters are lost. fail_open warns and goes on; fail_closed also holds LLM calls
    # until an operator runs `cascade state confirm-loss`. See docs/deploy.md.
    on_redis_loss: Literal["fail_open", "fail_closed"] = "fail_open"
    # How long a batch that needs the store (a control-plane write) waits for it; then the worker
    # exits with code 3. The hot path degrades instead (see cascade/state/base.py).
    outage_timeout_s: float = Field(300.0, gt=0, description="how long a worker waits out a state-store outage")


class BudgetConfig(_Section):
    calls_per_minute: int | None = Field(None, gt=0)
    calls_per_hour: int | None = Field(None, gt=0)
    calls_per_day: int | None = Field(None, gt=0)
    tokens_per_day: int | None = Field(None, gt=0)
    money_per_day: float | None = Field(None, gt=0)
    on_exhausted: Literal["cheap_tier", "hold"] = "cheap_tier"
    pace: bool = Field(
        True, description="spread each window's budget over the window instead of letting it be spent at its start"
    )
    fail_closed: bool = Field(False, description="refuse LLM calls when the budget store is unreachable")
    scope: str | None = Field(
        None, description="a named budget shared on purpose by every pipeline that names it; None: the pipeline's own"
    )


class ServerConfig(_Section):
    # /metrics and the probes: local only unless opened (a deployment sets 0.0.0.0).
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9100, ge=0, le=65535)
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "INFO"


class OutputConfig(_Section):
    """What the decisions topic carries: the decision alone (keyed by event id), or the original
    event enriched with it (the event's own key and headers), for consumers that would otherwise
    join decisions back to their events."""

    mode: Literal["decision", "enriched"] = "decision"
    field: str = Field("cascade", min_length=1, description="top-level key of the decision in an enriched event")
    # An event that already has ``field``: dead-lettered by the first tier before anything is paid
    # for it, or emitted with the field replaced by the decision.
    on_collision: Literal["dead_letter", "overwrite"] = "dead_letter"

    @field_validator("field")
    @classmethod
    def _top_level(cls, field: str) -> str:
        # Loud rather than surprising: task paths are dotted, this one is a single key.
        if "." in field:
            raise ValueError("output.field is one top-level key; dotted paths are not supported")
        return field


def _default_tiers() -> list[TierConfig]:
    return [LogisticTierConfig(name="logistic", cost=1.0)]


class CascadeConfig(BaseModel):
    """The whole configuration. Built directly it takes exactly the values given; only
    ``load_config`` reads a file and the environment."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    seed: int = 0
    # Scopes every Redis key (idempotency, cache, registry, live parameters, routing, budgets):
    # two pipelines on one Redis never see each other's state. Default: kafka.topic_prefix
    # without its trailing separator ("cascade." -> "cascade"). "" keeps the unscoped layout of
    # deployments from before pipelines (keys directly under redis.key_prefix).
    pipeline: str | None = Field(None, description="name scoping this pipeline's Redis state; default from kafka.topic_prefix")
    task: TaskConfig = Field(default_factory=TaskConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    tiers: list[AnyTierConfig] = Field(default_factory=_default_tiers, min_length=1)
    deferral: DeferralConfig = Field(default_factory=DeferralConfig)
    contract: ContractConfig = Field(default_factory=ContractConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @property
    def contract_on(self) -> bool:
        """The contract drives the thresholds: no fixed price given and a target set."""
        return not self.deferral.fixed_price and self.contract.targets

    @model_validator(mode="after")
    def _pipeline_named(self) -> CascadeConfig:
        if self.pipeline is None:
            self.pipeline = self.kafka.topic_prefix.rstrip(".:-_") or "cascade"
        elif any(c in self.pipeline for c in " {}*?[]"):
            # "" keeps the layout from before pipelines (keys directly under redis.key_prefix).
            raise ValueError("pipeline must be a name without spaces, braces or glob characters")
        return self

    @model_validator(mode="after")
    def _tier_names_unique(self) -> CascadeConfig:
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
