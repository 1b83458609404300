"""The x-ratelimit-* headers OpenAI clients read, on refusals and successes alike."""

from __future__ import annotations

import math

from llmserve.limits.state import Snapshot


def duration(seconds: float) -> str:
    """OpenAI's reset format: '250ms', '1s', '6m0s'."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


def rate_limit_headers(snapshot: Snapshot) -> dict[str, str]:
    headers: dict[str, str] = {}
    if snapshot.limit_requests is not None:
        headers["x-ratelimit-limit-requests"] = str(snapshot.limit_requests)
        headers["x-ratelimit-remaining-requests"] = str(max(snapshot.remaining_requests or 0, 0))
        headers["x-ratelimit-reset-requests"] = duration(snapshot.reset_requests_s or 0.0)
    if snapshot.limit_tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(snapshot.limit_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(max(snapshot.remaining_tokens or 0, 0))
        headers["x-ratelimit-reset-tokens"] = duration(snapshot.reset_tokens_s or 0.0)
    return headers
