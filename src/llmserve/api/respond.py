"""From a validated request to an HTTP response: one whole JSON body, or an SSE stream.

A stream's status is decided before its first byte where it can be: the first engine event is
awaited first (for up to one keep-alive interval), so a request refused by the queue or failing
before its first token gets a real status code. A request still waiting after that gets its
stream opened and SSE keep-alive comments until its first event; any later error is an in-band
SSE error event, and the stream still ends cleanly. Whatever happens, ``RequestRun.close`` runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from llmserve.api.admit import ticket_for
from llmserve.api.errors import json_response
from llmserve.api.state import Gateway
from llmserve.auth.principal import principal_for
from llmserve.config import ManagedModel, UpstreamModel
from llmserve.engines.events import EngineEvent
from llmserve.errors import LLMServeError, PermissionDenied
from llmserve.observability.request_metrics import RequestRecord
from llmserve.serving.request_run import RequestRun
from llmserve.serving.run import collect
from llmserve.streaming import sse
from llmserve.streaming.disconnect import DisconnectAwareStreamingResponse, until_disconnect
from llmserve.streaming.encoders import StreamEncoder
from llmserve.streaming.openai_format import full_response
from llmserve.validation.request import GenerationRequest

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def authorize(request: Request, model: str, canonical: str | None = None) -> None:
    """403 unless the caller's key may use ``model`` (by that name or its model's name)."""
    principal = principal_for(request)
    if not principal.allows(model) and not (canonical and principal.allows(canonical)):
        raise PermissionDenied(f"this API key may not use the model '{model[:256]}'", param="model")


async def start(request: Request, gw: Gateway, generation: GenerationRequest) -> RequestRun:
    """Reserve the key's quota (429 when over it), then set up queue and engine."""
    principal = principal_for(request)
    config = gw.models.config(generation.model)
    timeout_s = gw.settings.limits.request_timeout_s
    if isinstance(config, UpstreamModel | ManagedModel):
        timeout_s = min(timeout_s, config.total_timeout_s or timeout_s)
        session = request.headers.get(config.routing.session_header)
        if session:
            generation = dataclasses.replace(generation, session=session)
    ticket = ticket_for(request, generation, principal, config, timeout_s)
    reservation = await gw.limiter.reserve(principal, ticket.cost, generation.request_id)
    record = RequestRecord(generation, principal.name)
    record.start_span(dict(request.headers))
    request.scope.setdefault("state", {})["record"] = record  # for the access line
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


async def respond_whole(
    request: Request, run: RequestRun, generation: GenerationRequest
) -> Response:
    try:
        result = await until_disconnect(request, collect(run.events, generation))
    finally:
        await run.close()
    return json_response(200, full_response(generation, result), run.headers)


async def respond_stream(
    request: Request, run: RequestRun, encoder: StreamEncoder, keepalive_s: float
) -> Response:
    first: asyncio.Task[EngineEvent | None] = asyncio.ensure_future(anext(run.events, None))

    async def close() -> None:
        if not first.done():
            first.cancel()
            await asyncio.wait({first})
        if not first.cancelled():
            first.exception()  # reported to the client already; mark it retrieved
        await run.close()

    try:
        await until_disconnect(request, asyncio.wait({first}, timeout=keepalive_s))
        if first.done():
            first.result()  # a failure before the first byte gets its own status code
    except BaseException:
        await close()
        raise
    return DisconnectAwareStreamingResponse(
        _frames(first, run, encoder, keepalive_s),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **run.headers},
        on_close=close,
    )


async def _frames(
    first: asyncio.Task[EngineEvent | None],
    run: RequestRun,
    encoder: StreamEncoder,
    keepalive_s: float,
) -> AsyncIterator[bytes]:
    try:
        while not first.done():
            await asyncio.wait({first}, timeout=keepalive_s)
            if not first.done():
                yield sse.comment("keep-alive")
        event = first.result()
        if event is not None:
            for frame in encoder.encode(event):
                yield frame
            async for event in run.events:
                for frame in encoder.encode(event):
                    yield frame
        for frame in encoder.end():
            yield frame
    except LLMServeError as exc:
        for frame in encoder.error(exc):
            yield frame
    except Exception:
        log.exception("a stream failed after it started")
        for frame in encoder.error(LLMServeError("internal server error")):
            yield frame
