"""Configuration: one YAML file plus ``LLMSERVE_*`` environment overrides (pydantic-settings).

No file at all means the embedded models, both served by in-process vLLM engines:
SmolLM2-135M-Instruct for chat and completions, all-MiniLM-L6-v2 for embeddings. Every limit has
a safe default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

EmbeddedName = Literal["smollm2-135m-instruct", "all-minilm-l6-v2"]
EMBEDDED_MODEL_NAME: EmbeddedName = "smollm2-135m-instruct"
# The embedding model served beside it by default (models/catalog.py has both).
EMBEDDED_EMBEDDING_NAME: EmbeddedName = "all-minilm-l6-v2"


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("url must start with http:// or https://")
    return value.rstrip("/")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdmissionConfig(_Strict):
    """The bounded queue in front of one model's engine (see scheduling/queue_state.py)."""

    max_waiting_requests: int = Field(default=256, ge=0)
    max_waiting_tokens: int = Field(default=2_000_000, gt=0)
    # Requests running on the engine at once; the rest wait in the gateway's queue, not vLLM's.
    max_in_flight: int = Field(default=64, gt=0)
    # Longest wait in the queue; a request may ask for less with the X-Queue-Timeout header.
    queue_timeout_s: float = Field(default=60.0, gt=0)
    # Grouping of similar-length prompts: 0 turns it off (the measured default, see docs).
    group_window_s: float = Field(default=0.0, ge=0, le=5)
    group_buckets: tuple[int, ...] = (256, 1024)


class _Model(_Strict):
    admission: AdmissionConfig = AdmissionConfig()
    # Other public names for this model; responses and metrics use ``name``.
    aliases: tuple[str, ...] = ()


class VllmModel(_Model):
    """A model served by vLLM in this process (its engine core runs in a child process)."""

    engine: Literal["vllm"] = "vllm"
    name: str = EMBEDDED_MODEL_NAME
    # A local folder or a Hugging Face name; None means the embedded model named by ``embedded``,
    # prepared on first use.
    model: str | None = None
    embedded: EmbeddedName = EMBEDDED_MODEL_NAME
    # Passed verbatim to vllm.AsyncEngineArgs (tensor_parallel_size, max_model_len, dtype, ...).
    engine_args: dict[str, Any] = Field(default_factory=dict)
    # CPU builds of vLLM reserve this much host memory for the KV cache (VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: float = Field(default=1.0, gt=0)
    # The `vllm serve` knobs of vLLM's OpenAI layer, with their flags' meaning. None for an
    # embedded model means its own choice: SmolLM2 with vLLM's xlam tool parser.
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool | None = None
    reasoning_parser: str | None = None
    # A Jinja template, or a path to one, instead of the model's own.
    chat_template: str | None = None
    default_chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)


class RoutingConfig(_Strict):
    """How a model's requests are spread over its replicas."""

    # least_outstanding: the replica with the fewest requests in flight. session: the same
    # session (header, else the body's ``user``) always goes to the same replica. prefix: the
    # same prompt prefix goes to the same replica, so vLLM's prefix cache is hit.
    policy: Literal["least_outstanding", "session", "prefix"] = "least_outstanding"
    session_header: str = "x-session-id"
    prefix_chars: int = Field(default=1024, gt=0)


class HealthConfig(_Strict):
    """Active checks (GET /health) and passive ones (errors, timeouts, stalled streams)."""

    interval_s: float = Field(default=5.0, gt=0)
    # A replica taken out is probed this often until it answers again.
    probe_interval_s: float = Field(default=2.0, gt=0)
    timeout_s: float = Field(default=5.0, gt=0)
    # Consecutive failed requests that take a replica out. It stays out probe_interval_s, then
    # twice that after its next ejection (no successful request in between)... up to
    # max_ejection_s, so a replica whose /health passes while its requests fail costs less and
    # less; then a passing check brings it back.
    eject_after_failures: int = Field(default=1, gt=0)
    max_ejection_s: float = Field(default=60.0, gt=0)


class UpstreamReplica(_Strict):
    url: str
    # Overrides the model's api_key for this replica.
    api_key: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _http_url(value)


class RemoteModel(_Model):
    """What every model behind OpenAI-compatible servers shares: routing, health, timeouts."""

    # The model's name at the upstream; defaults to ``name``.
    upstream_model: str | None = None
    # The upstream's context length, reported in /v1/models. Not used to refuse prompts: counts
    # here are estimates, so the context check is left to the upstream (its 400 is passed on).
    max_model_len: int | None = Field(default=None, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    first_token_timeout_s: float = Field(default=120.0, gt=0)
    between_tokens_timeout_s: float = Field(default=60.0, gt=0)
    # Queue and generation together; None means limits.request_timeout_s.
    total_timeout_s: float | None = Field(default=None, gt=0)
    max_connections: int = Field(default=1000, gt=0)
    # How long an idle connection to a replica is kept for reuse; below the upstream's own
    # keep-alive timeout (5 s for vllm serve) so the gateway closes first.
    keepalive_timeout_s: float = Field(default=4.0, gt=0)
    routing: RoutingConfig = RoutingConfig()
    health: HealthConfig = HealthConfig()


class UpstreamModel(RemoteModel):
    """A model served by OpenAI-compatible servers elsewhere (``vllm serve``, TGI, SGLang...):
    ``url`` for one, ``replicas`` for several."""

    engine: Literal["openai"]
    name: str
    url: str | None = None
    replicas: tuple[UpstreamReplica, ...] = ()
    api_key: SecretStr | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return _http_url(value) if value is not None else None

    @model_validator(mode="after")
    def _one_way_to_say_where(self) -> UpstreamModel:
        if (self.url is None) == (not self.replicas):
            raise ValueError("give either url (one replica) or replicas (one or more), not both")
        return self

    @property
    def endpoints(self) -> tuple[UpstreamReplica, ...]:
        if self.url is not None:
            return (UpstreamReplica(url=self.url, api_key=self.api_key),)
        return tuple(
            r if r.api_key is not None else UpstreamReplica(url=r.url, api_key=self.api_key)
            for r in self.replicas
        )


class ManagedModel(RemoteModel):
    """``vllm serve`` processes that llmserve starts on loopback, health-checks and restarts with
    backoff when they exit; a crash never takes down the gateway or the other models."""

    engine: Literal["managed"]
    name: str
    # A local folder or a Hugging Face name; None means the embedded default (prepared once).
    model: str | None = None
    replicas: int = Field(default=1, gt=0, le=64)
    # Extra arguments for vLLM's OpenAI server (--tensor-parallel-size, --max-model-len, ...).
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    # The whole command instead of vLLM's server; "{port}" and "{model}" are filled in.
    command: tuple[str, ...] | None = None
    # The first replica listens here, the next on base_port + 1...; None: free ports.
    base_port: int | None = Field(default=None, gt=0, le=65535)
    startup_timeout_s: float = Field(default=900.0, gt=0)
    restart_backoff_s: float = Field(default=1.0, gt=0)
    restart_backoff_max_s: float = Field(default=60.0, gt=0)
    # CPU builds of vLLM reserve this much host memory for the KV cache (VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: float = Field(default=1.0, gt=0)


class SimulatedModel(_Model):
    """The simulated engine: a deterministic test and benchmark double, not a model."""

    engine: Literal["simulated"]
    name: str
    tokens_per_second: float = Field(default=50.0, gt=0)
    first_token_latency_s: float = Field(default=0.05, ge=0)
    max_model_len: int = Field(default=4096, gt=0)


ModelConfig = Annotated[
    VllmModel | UpstreamModel | ManagedModel | SimulatedModel, Field(discriminator="engine")
]


def _embedded() -> list[ModelConfig]:
    """No models configured: the embedded chat model, and the embedding model beside it."""
    return [
        VllmModel(),
        VllmModel(name=EMBEDDED_EMBEDDING_NAME, embedded=EMBEDDED_EMBEDDING_NAME),
    ]


class Limits(_Strict):
    """Bounds on what one request may ask for. Crossing one is a 400/413, never a 500."""

    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    max_tokens: int = Field(default=4096, gt=0)
    default_max_tokens: int = Field(default=256, gt=0)
    max_n: int = Field(default=8, gt=0)
    max_stop_sequences: int = Field(default=8, ge=0)
    max_stop_sequence_chars: int = Field(default=256, gt=0)
    max_logprobs: int = Field(default=20, ge=0)
    max_messages: int = Field(default=1024, gt=0)
    # Inputs in one embeddings request (OpenAI's own bound is 2048).
    max_embedding_inputs: int = Field(default=2048, gt=0)
    # Requests longer than this (seconds, queue and generation together) end with a timeout error.
    request_timeout_s: float = Field(default=600.0, gt=0)
    # Slow or oversized request heads and bodies (slowloris): 431 over the size, 408 over the time.
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)


class AuthConfig(_Strict):
    """API keys. On unless switched off here, and the server says so loudly when it is."""

    enabled: bool = True
    # The keys file (hashes only); None means ``<config dir>/keys.yaml`` (see ``keys_path``).
    keys_file: Path | None = None
    # Routes anyone may call; every other path needs a key.
    public_paths: tuple[str, ...] = ("/health", "/ready", "/metrics")
    # How often the keys file is checked for changes (created, revoked keys apply without restart).
    reload_interval_s: float = Field(default=2.0, gt=0)


class CorsConfig(_Strict):
    """Cross-origin browser access. Closed unless origins are listed: an API key in a browser page
    is readable by anyone who loads it, so opening this is a deliberate choice."""

    allow_origins: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ("authorization", "content-type", "x-request-id")
    max_age_s: int = Field(default=600, ge=0)


class RateLimitConfig(_Strict):
    """Per-key limits state: in memory (one replica) or in Redis (several replicas)."""

    store: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "llmserve:rl"
    # When Redis cannot be reached: refuse requests with 503 (fail_closed) or serve them unlimited.
    on_store_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    store_timeout_s: float = Field(default=0.5, gt=0)


class ObservabilityConfig(_Strict):
    # OTLP/HTTP collector base URL (e.g. http://otel-collector:4318); None turns tracing off.
    otlp_endpoint: str | None = None
    service_name: str = "llmserve"
    # json: one JSON object per line (access lines included); text: for a terminal.
    log_format: Literal["json", "text"] = "text"
    access_log: bool = True


class Settings(BaseSettings):
    """The whole configuration, built once at start and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="LLMSERVE_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Where prepared models are cached (the embedded default among them).
    cache_dir: Path = Path.home() / ".cache" / "llmserve"
    models: list[ModelConfig] = Field(default_factory=_embedded, min_length=1)
    limits: Limits = Limits()
    # A streaming request still waiting for its first event after this long (in the queue, or
    # in a long prefill) gets its stream opened and an SSE comment every interval, so proxies
    # and clients do not time it out. Gaps between tokens get none.
    keepalive_interval_s: float = Field(default=10.0, gt=0)
    # On SIGTERM: stop admitting, let running requests finish this long, then abort the rest.
    drain_timeout_s: float = Field(default=30.0, ge=0)
    auth: AuthConfig = AuthConfig()
    cors: CorsConfig = CorsConfig()
    observability: ObservabilityConfig = ObservabilityConfig()
    rate_limits: RateLimitConfig = RateLimitConfig()

    @property
    def keys_path(self) -> Path:
        return self.auth.keys_file or Path.home() / ".config" / "llmserve" / "keys.yaml"

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        names = [name for m in models for name in (m.name, *m.aliases)]
        if len(names) != len(set(names)):
            raise ValueError(f"model names and aliases must be unique, got {names}")
        return models

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Reads model_config["yaml_file"]; no file configured means no YAML layer.
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings: explicit overrides > environment > YAML file > defaults."""
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file not found: {config_file}")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(yaml_file=config_file)

    return FileSettings(**overrides)
