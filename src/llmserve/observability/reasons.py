"""One bounded vocabulary for why a request ended badly: metric labels and log fields."""

from __future__ import annotations

from llmserve.errors import (
    BodyTimeout,
    ClientDisconnected,
    EngineTimeout,
    InvalidRequest,
    LimiterUnavailable,
    LLMServeError,
    PermissionDenied,
    QueueFull,
    QueueTimeout,
    RateLimited,
)

# Most specific first: the first matching class names the reason.
_REASONS: tuple[tuple[type[LLMServeError], str], ...] = (
    (ClientDisconnected, "disconnect"),
    (RateLimited, "rate_limit"),
    (QueueTimeout, "deadline"),
    (QueueFull, "queue_full"),
    (LimiterUnavailable, "limiter_unavailable"),
    (PermissionDenied, "permission"),
    (InvalidRequest, "validation"),
    (BodyTimeout, "client_timeout"),
    (EngineTimeout, "timeout"),
)


def reason_for(exc: BaseException) -> str:
    if isinstance(exc, QueueFull) and exc.code == "draining":
        return "draining"
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    if isinstance(exc, LLMServeError):
        return "validation" if exc.status in (400, 404, 413, 422) else "engine_error"
    return "internal"
