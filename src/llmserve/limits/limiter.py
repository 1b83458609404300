"""Reserve a request's quota before it may queue, and refund the unused part when it ends."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass

import anyio

from llmserve.auth.principal import Principal
from llmserve.config import RateLimitConfig
from llmserve.errors import LimiterUnavailable, RateLimited
from llmserve.limits.redis_store import RedisStore
from llmserve.limits.store import LimitStore, MemoryStore
from llmserve.observability.metrics import RATE_LIMIT_STORE_ERRORS, RATE_LIMIT_STORE_UP
from llmserve.quota import QuotaSnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reservation:
    principal: Principal
    request_id: str
    cost: int
    quota: QuotaSnapshot


class RateLimiter:
    def __init__(self, store: LimitStore, config: RateLimitConfig) -> None:
        self._store = store
        self._config = config
        self._pending: set[asyncio.Task[None]] = set()
        if isinstance(store, MemoryStore):
            RATE_LIMIT_STORE_UP.set(1)  # in memory: always up

    @classmethod
    def from_config(cls, config: RateLimitConfig, lease_s: float) -> RateLimiter:
        if config.store == "redis":
            store: LimitStore = RedisStore(
                config.redis_url, config.key_prefix, lease_s, config.store_timeout_s
            )
        else:
            store = MemoryStore()
        return cls(store, config)

    async def reserve(self, principal: Principal, cost: int, request_id: str) -> Reservation | None:
        """Take the request's quota, or raise RateLimited (429). None: nothing to account."""
        if not principal.limited:
            return None
        if principal.tpm is not None and cost > principal.tpm:
            raise RateLimited(
                f"this request may use {cost} tokens (prompt + max_tokens * n), more than the "
                f"key's limit of {principal.tpm} tokens per minute; lower max_tokens",
                code="tokens_exceed_limit",
            )
        try:
            async with asyncio.timeout(self._config.store_timeout_s * 2):
                decision = await self._store.reserve(principal, cost, request_id)
        except Exception as exc:
            # The store may still run the reservation after we gave up on it: undo it later,
            # harmlessly if it never happened (a release of an unknown id changes nothing).
            self._compensate(principal, request_id, cost)
            self._store_failed(exc)
            return None
        RATE_LIMIT_STORE_UP.set(1)
        if not decision.allowed:
            retry = max(1, math.ceil(decision.retry_after_s))
            raise RateLimited(
                f"rate limit reached for key '{principal.name}' ({_what(decision.reason)}); "
                f"retry after {retry} s",
                retry_after_s=retry,
                quota=decision.snapshot,
            )
        return Reservation(principal, request_id, cost, decision.snapshot)

    async def release(self, reservation: Reservation | None, used_tokens: int) -> None:
        """Free the concurrency slot and refund the tokens reserved but not used. Never raises."""
        if reservation is None:
            return
        refund = max(reservation.cost - used_tokens, 0)
        with anyio.CancelScope(shield=True):
            try:
                async with asyncio.timeout(self._config.store_timeout_s * 2):
                    await self._store.release(reservation.principal, reservation.request_id, refund)
            except Exception as exc:
                # The concurrency lease expires on its own in Redis; tokens refill with time.
                RATE_LIMIT_STORE_ERRORS.labels("release_failed").inc()
                RATE_LIMIT_STORE_UP.set(0)
                log.warning("rate-limit release failed for %s: %s", reservation.request_id, exc)

    def _compensate(self, principal: Principal, request_id: str, cost: int) -> None:
        # Sent at once: Redis runs commands in arrival order, so this release lands after the
        # reservation it undoes (if that was received at all). Retried while Redis is away.
        async def undo() -> None:
            for attempt in range(5):
                try:
                    await self._store.release(principal, request_id, cost)
                    return
                except Exception:
                    await asyncio.sleep(self._config.store_timeout_s * 2**attempt)

        task = asyncio.ensure_future(undo())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _store_failed(self, exc: Exception) -> None:
        RATE_LIMIT_STORE_UP.set(0)
        if self._config.on_store_error == "fail_open":
            RATE_LIMIT_STORE_ERRORS.labels("fail_open").inc()
            log.warning("rate-limit store unreachable, serving without limits: %s", exc)
            return
        RATE_LIMIT_STORE_ERRORS.labels("fail_closed").inc()
        log.error("rate-limit store unreachable, refusing requests: %s", exc)
        raise LimiterUnavailable(
            "the rate limiter is unavailable; retry shortly", retry_after_s=5
        ) from exc

    async def close(self) -> None:
        for task in self._pending:
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        await self._store.close()


def _what(reason: str) -> str:
    return {
        "requests": "requests per minute",
        "tokens": "tokens per minute",
        "concurrency": "concurrent requests",
    }.get(reason, reason)
