"""From a validated request to an HTTP response: one whole JSON body, or an SSE stream.

A stream's status is decided before its first byte where it can be: the first engine event is
awaited first (for up to one keep-alive interval), so a request refused by the queue or failing
before its first token gets a real status code. A request still waiting after that gets its
stream opened and SSE keep-alive comments until its first event; any later error is an in-band
SSE error event, and the stream still ends cleanly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import Response

from llmserve.api.admit import ticket_for
from llmserve.api.errors import json_response
from llmserve.api.state import Gateway
from llmserve.auth.principal import principal_for
from llmserve.engines.events import EngineEvent
from llmserve.errors import LLMServeError
from llmserve.serving.run import collect, run_on_engine
from llmserve.streaming import sse
from llmserve.streaming.disconnect import DisconnectAwareStreamingResponse, until_disconnect
from llmserve.streaming.encoders import StreamEncoder
from llmserve.streaming.openai_format import full_response
from llmserve.validation.request import GenerationRequest

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Events = AsyncGenerator[EngineEvent, None]


def start(request: Request, gw: Gateway, generation: GenerationRequest) -> Events:
    """The request's events: admission, then the engine, with every release guaranteed."""
    ticket = ticket_for(
        request, generation, principal_for(request), gw.models.config(generation.model)
    )
    return run_on_engine(
        gw.models.get(generation.model),
        generation,
        gw.settings.limits.request_timeout_s,
        gw.models.admission(generation.model),
        ticket,
    )


async def respond_whole(
    request: Request, events: Events, generation: GenerationRequest
) -> Response:
    try:
        result = await until_disconnect(request, collect(events, generation))
    finally:
        await events.aclose()
    return json_response(200, full_response(generation, result))


async def respond_stream(
    request: Request, events: Events, encoder: StreamEncoder, keepalive_s: float
) -> Response:
    first: asyncio.Task[EngineEvent | None] = asyncio.ensure_future(anext(events, None))
    try:
        await until_disconnect(request, asyncio.wait({first}, timeout=keepalive_s))
        if first.done():
            first.result()  # a failure before the first byte gets its own status code
    except BaseException:
        await _discard(first, events)
        raise
    return DisconnectAwareStreamingResponse(
        _frames(first, events, encoder, keepalive_s),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


async def _frames(
    first: asyncio.Task[EngineEvent | None],
    events: Events,
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
            async for event in events:
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
    finally:
        await _discard(first, events)


async def _discard(first: asyncio.Task[EngineEvent | None], events: Events) -> None:
    """Stop the request's work, whatever state it is in; safe under cancellation."""
    with anyio.CancelScope(shield=True):
        if not first.done():
            first.cancel()
            await asyncio.wait({first})
        if not first.cancelled():
            first.exception()  # reported to the client already; mark it retrieved
        await events.aclose()
