"""Prometheus metrics. Labels are bounded: model, key name, reason; never keys or prompts."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

RATE_LIMIT_STORE_ERRORS = Counter(
    "llmserve_rate_limit_store_errors_total",
    "Rate-limit store operations that failed (e.g. Redis unreachable), by the choice applied.",
    ["outcome"],
)
RATE_LIMIT_STORE_UP = Gauge(
    "llmserve_rate_limit_store_up", "1 when the last rate-limit store operation succeeded."
)
REJECTIONS = Counter(
    "llmserve_rejections_total",
    "Requests refused before the engine, by reason.",
    ["reason", "key"],
)
