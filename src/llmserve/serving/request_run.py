"""One request's run after validation: quota reserved, then queue and engine (``run_on_engine``),
then the unused quota refunded and the request recorded. ``close`` ends everything exactly once
and may be called from any exit path; the response layer calls it whatever happened, so nothing
depends on the garbage collector finalising a generator."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator

import anyio

from llmserve.engines.base import Engine
from llmserve.engines.events import EngineEvent
from llmserve.limits.limiter import RateLimiter, Reservation
from llmserve.observability.reasons import reason_for
from llmserve.observability.request_metrics import RequestRecord
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
        record: RequestRecord,
    ) -> None:
        self._limiter = limiter
        self._reservation = reservation
        self._closed = False
        self.record = record
        self.headers = dict(reservation.headers) if reservation else {}
        if record.trace_headers:
            generation = dataclasses.replace(generation, trace_headers=record.trace_headers)
        self._inner = run_on_engine(
            engine, generation, timeout_s, admission, ticket, on_admitted=record.admitted
        )
        self.events = self._observed()

    async def _observed(self) -> AsyncGenerator[EngineEvent, None]:
        try:
            async for event in self._inner:
                self.record.observe(event)
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            self.record.status = "disconnect"
            raise
        except Exception as exc:
            self.record.status = reason_for(exc)
            raise

    @property
    def used_tokens(self) -> int:
        """What the key is charged: the prompt, plus what was generated before the end."""
        return self.record.generation.prompt_tokens + self.record.completion_tokens

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self.events.aclose()
            await self._inner.aclose()
            await self._limiter.release(self._reservation, self.used_tokens)
            self.record.finish()
