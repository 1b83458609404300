"""One request's run after validation: quota reserved, then queue and engine (``run_on_engine``),
then the unused quota refunded and the request recorded. ``close`` ends everything exactly once
and may be called from any exit path; the response layer calls it whatever happened, so nothing
depends on the garbage collector finalising a generator."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import anyio

from llmserve.auth.principal import Principal
from llmserve.config import RemoteModel
from llmserve.engines.base import Engine
from llmserve.limits.limiter import RateLimiter, Reservation
from llmserve.scheduling.admission import Admission, Ticket
from llmserve.serving.engine_request import run_on_engine
from llmserve.serving.gateway import Gateway
from llmserve.serving.record import RequestRecord
from llmserve.serving.ticket import ticket_for
from llmserve.validation.request import ValidatedRequest


@dataclass(frozen=True, slots=True)
class Caller:
    """What serving needs of the HTTP request: who asks, and the headers it sent (session,
    queue timeout, trace context)."""

    principal: Principal
    headers: Mapping[str, str]


async def start_run(gw: Gateway, generation: ValidatedRequest, caller: Caller) -> RequestRun:
    """Reserve the key's quota (429 when over it), then set up queue and engine."""
    config = gw.models.config(generation.model)
    timeout_s = gw.settings.limits.request_timeout_s
    if isinstance(config, RemoteModel):
        timeout_s = min(timeout_s, config.total_timeout_s or timeout_s)
        session = caller.headers.get(config.routing.session_header)
        if session:
            generation = dataclasses.replace(generation, session=session)
    ticket = ticket_for(caller.headers, generation, caller.principal, config, timeout_s)
    reservation = await gw.limiter.reserve(caller.principal, ticket.cost, generation.request_id)
    record = RequestRecord(generation, caller.principal.name)
    record.start_span(caller.headers)
    return RequestRun(
        gw.models.get(generation.model),
        generation,
        timeout_s,
        gw.models.admission(generation.model),
        ticket,
        gw.limiter,
        reservation,
        record,
    )


class RequestRun:
    def __init__(
        self,
        engine: Engine,
        generation: ValidatedRequest,
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
