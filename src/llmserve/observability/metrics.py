"""Prometheus metrics. Labels are bounded: model, key name, status and reason enums; never
keys, prompts or request ids. Counters and histograms live in the default registry (beside
vLLM's own ``vllm:*`` metrics in in-process mode); gauges are read at scrape time from the live
queue state by ``collectors.py``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from llmserve.observability.loop_histogram import LoopHistogram

# LLM latencies run from milliseconds (a token) to minutes (a long generation in a full queue).
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

PROMPT_TOKENS = Counter(
    "llmserve_prompt_tokens", "Prompt tokens of finished requests.", ["model", "key"]
)
GENERATION_TOKENS = Counter(
    "llmserve_generation_tokens", "Generated tokens (rate() gives tokens/s).", ["model", "key"]
)
REQUESTS = Counter(
    "llmserve_requests",
    "Requests that reached the engine pipeline, by how they ended.",
    ["model", "key", "status"],
)
REJECTIONS = Counter(
    "llmserve_rejections",
    "Requests answered with an error status before any response byte, by reason.",
    ["reason", "key"],
)


def count_rejection(reason: str, key: str) -> None:
    REJECTIONS.labels(reason, key).inc()


TIME_TO_FIRST_TOKEN = Histogram(
    "llmserve_time_to_first_token_seconds",
    "From the request's arrival to its first token (queue wait included).",
    ["model"],
    buckets=_TTFT_BUCKETS,
)
# Observed once per streamed token: a lock-free histogram (see loop_histogram.py).
INTER_TOKEN_LATENCY = LoopHistogram(
    "llmserve_inter_token_latency_seconds",
    "Between consecutive token deltas of a stream.",
    ["model"],
    buckets=_ITL_BUCKETS,
)
REQUEST_DURATION = Histogram(
    "llmserve_request_duration_seconds",
    "End-to-end latency of requests that reached the engine pipeline.",
    ["model"],
    buckets=_E2E_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "llmserve_queue_wait_seconds",
    "Time admitted requests spent in the gateway's queue.",
    ["model"],
    buckets=_QUEUE_BUCKETS,
)
RATE_LIMIT_STORE_ERRORS = Counter(
    "llmserve_rate_limit_store_errors",
    "Rate-limit store operations that failed (e.g. Redis unreachable), by the choice applied.",
    ["outcome"],
)
RATE_LIMIT_STORE_UP = Gauge(
    "llmserve_rate_limit_store_up", "1 when the last rate-limit store operation succeeded."
)

UPSTREAM_FAILURES = Counter(
    "llmserve_upstream_failures",
    "Failed requests to a model's replica, by kind (unreachable, connect_timeout, "
    "first_token_timeout, between_tokens_timeout, http_error, broken_stream, malformed, ...).",
    ["model", "replica", "kind"],
)
ROUTING_DECISIONS = Counter(
    "llmserve_routing_decisions",
    "Replica choices of the affinity policies (session, prefix, cache_aware), by reason: "
    "affinity (the policy's own choice), load_bound (the bound sent it to the next one), "
    "fallback (no affinity: the least loaded).",
    ["model", "reason"],
)
PREFIX_BLOCKS = Counter(
    "llmserve_routing_prefix_blocks",
    "cache_aware: prompt blocks sent to each replica, by whether the gateway's index expected "
    "the replica to hold them (hit) or not (miss); hit / (hit + miss) estimates its prefix "
    "cache hit rate.",
    ["model", "replica", "outcome"],
)
FAILOVERS = Counter(
    "llmserve_failovers",
    "Requests retried on another replica after a failure before their first token.",
    ["model"],
)
ENGINE_RESTARTS = Counter(
    "llmserve_engine_restarts",
    "Engine processes restarted after they died: managed vllm serve children (replica label), "
    'or an in-process engine core (replica="in-process").',
    ["model", "replica"],
)
