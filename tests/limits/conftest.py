"""The limits tests' fixtures: a real Redis (``tests.support.redis_server``) and a spy on the
limiter's reservations and releases."""

from __future__ import annotations

from typing import Any

import pytest

from llmserve.limits.limiter import RateLimiter, Reservation
from tests.limits.helpers import Accounted, LimiterSpy
from tests.support.redis_server import redis_server

__all__ = ["limiter_spy", "redis_server"]


@pytest.fixture
def limiter_spy(monkeypatch: pytest.MonkeyPatch) -> LimiterSpy:
    spy = LimiterSpy()
    reserve, release = RateLimiter.reserve, RateLimiter.release

    async def spy_reserve(self: RateLimiter, principal: Any, cost: int, request_id: str) -> Any:
        reservation = await reserve(self, principal, cost, request_id)
        if reservation is not None:
            spy.reserved.append(Accounted(principal.name, request_id, cost))
            spy.log.append(("reserve", request_id))
        return reservation

    async def spy_release(self: RateLimiter, reservation: Reservation | None, used: int) -> None:
        await release(self, reservation, used)
        if reservation is not None:
            spy.log.append(("release", reservation.request_id))
            spy.released.append(
                Accounted(
                    reservation.principal.name, reservation.request_id, reservation.cost, used
                )
            )

    monkeypatch.setattr(RateLimiter, "reserve", spy_reserve)
    monkeypatch.setattr(RateLimiter, "release", spy_release)
    return spy
