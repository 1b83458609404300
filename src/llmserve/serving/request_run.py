"""One request's run after validation: quota reserved, then queue and engine (``run_on_engine``),
then the unused quota refunded. ``close`` ends everything exactly once and may be called from any
exit path; the response layer calls it whatever happened, so nothing depends on the garbage
collector finalising a generator."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import anyio

from llmserve.engines.base import Engine
from llmserve.engines.events import EngineEvent, TextDelta, UsageReport
from llmserve.limits.limiter import RateLimiter, Reservation
from llmserve.scheduling.admission import Admission, Ticket
from llmserve.serving.run import run_on_engine
from llmserve.validation.request import GenerationRequest


class RequestRun:
    def __init__(
        self,
        engine: Engine,
        generation: GenerationRequest,
        timeout_s: float,
        admission: Admission,
        ticket: Ticket,
        limiter: RateLimiter,
        reservation: Reservation | None,
    ) -> None:
        self._limiter = limiter
        self._reservation = reservation
        self._prompt_tokens = generation.prompt_tokens
        # Tokens to charge the key: the prompt, plus what was generated before the end.
        self._used = generation.prompt_tokens
        self._closed = False
        self.headers = dict(reservation.headers) if reservation else {}
        self._inner = run_on_engine(engine, generation, timeout_s, admission, ticket)
        self.events = self._counted()

    async def _counted(self) -> AsyncGenerator[EngineEvent, None]:
        generated = 0
        async for event in self._inner:
            if isinstance(event, TextDelta):
                generated += event.num_tokens
                self._used = self._prompt_tokens + generated
            elif isinstance(event, UsageReport):
                self._used = event.prompt_tokens + event.completion_tokens
            yield event

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self.events.aclose()
            await self._inner.aclose()
            await self._limiter.release(self._reservation, self._used)
