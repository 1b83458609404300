"""One request's run after validation: quota reserved, then queue and engine (``run_on_engine``),
then the unused quota refunded and the request recorded. ``close`` ends everything exactly once
and may be called from any exit path; the response layer calls it whatever happened, so nothing
depends on the garbage collector finalising a generator."""

from __future__ import annotations

import dataclasses

import anyio

from llmserve.engines.base import Engine
from llmserve.limits.limiter import RateLimiter, Reservation
from llmserve.scheduling.admission import Admission, Ticket
from llmserve.serving.record import RequestRecord
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
        # The key's quota after the reservation, for the x-ratelimit-* headers (api.headers).
        self.quota = reservation.quota if reservation else None
        if record.trace_headers:
            generation = dataclasses.replace(generation, trace_headers=record.trace_headers)
        # The record observes the run by plain calls: no extra generator layer per token.
        self.events = run_on_engine(engine, generation, timeout_s, admission, ticket, record)

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
            await self._limiter.release(self._reservation, self.used_tokens)
            self.record.finish()
