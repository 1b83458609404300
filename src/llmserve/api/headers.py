"""The one place response headers are made from what lower layers hand up: ``Retry-After`` from
an error's seconds, and the ``x-ratelimit-*`` headers OpenAI clients read from a quota snapshot
(on refusals and successes alike)."""

from __future__ import annotations

import math

from llmserve.errors import LLMServeError, RateLimited
from llmserve.quota import QuotaSnapshot


def duration(seconds: float) -> str:
    """OpenAI's reset format: '250ms', '1s', '6m0s'."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def rate_limit_headers(snapshot: QuotaSnapshot | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    if snapshot is None:
        return headers
    if snapshot.limit_requests is not None:
        headers["x-ratelimit-limit-requests"] = str(snapshot.limit_requests)
        headers["x-ratelimit-remaining-requests"] = str(max(snapshot.remaining_requests or 0, 0))
        headers["x-ratelimit-reset-requests"] = duration(snapshot.reset_requests_s or 0.0)
    if snapshot.limit_tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(snapshot.limit_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(max(snapshot.remaining_tokens or 0, 0))
        headers["x-ratelimit-reset-tokens"] = duration(snapshot.reset_tokens_s or 0.0)
    return headers


def error_headers(exc: LLMServeError) -> dict[str, str]:
    """The headers of an error answered with a status: the key's quota, then Retry-After."""
    headers = rate_limit_headers(exc.quota) if isinstance(exc, RateLimited) else {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    return headers
