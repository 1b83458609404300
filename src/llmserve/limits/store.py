"""Where limit state lives: the store interface and the in-memory store (one replica)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from llmserve.auth.principal import Principal
from llmserve.limits.buckets import Decision, KeyLimits


class LimitStore(Protocol):
    async def reserve(self, principal: Principal, cost: int, request_id: str) -> Decision: ...

    async def release(self, principal: Principal, request_id: str, refund: int) -> None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """Limits for one gateway replica; atomic because nothing here awaits."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, KeyLimits] = {}

    def _limits(self, principal: Principal) -> KeyLimits:
        current = self._keys.get(principal.name)
        wanted = (principal.rpm, principal.tpm, principal.max_concurrent)
        if current is None or (current.rpm, current.tpm, current.max_concurrent) != wanted:
            # New key, or its limits changed in the keys file: start from full buckets.
            running = current.running if current else set()
            current = KeyLimits(*wanted, running=running)
            self._keys[principal.name] = current
        return current

    async def reserve(self, principal: Principal, cost: int, request_id: str) -> Decision:
        return self._limits(principal).reserve(cost, request_id, self._clock())

    async def release(self, principal: Principal, request_id: str, refund: int) -> None:
        self._limits(principal).release(request_id, refund, self._clock())

    async def close(self) -> None:
        return None
