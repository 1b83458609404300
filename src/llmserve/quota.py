"""What a key's quota looks like at one moment: the figures OpenAI's ``x-ratelimit-*`` headers
carry. The limiter measures it, errors and reservations carry it up, and only the HTTP layer
(``api.headers``) turns it into headers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class QuotaSnapshot:
    """None fields are limits the key does not have."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
