"""From a validated request to an HTTP response: one whole JSON body, or an SSE stream.

A stream's status is decided before its first byte: the first engine event is awaited first, so a
request that fails before its first token gets a real status code. After that, an error is an
in-band SSE error event, and the stream still ends cleanly.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from llmserve.api.errors import json_response
from llmserve.config import Limits
from llmserve.engines.base import Engine
from llmserve.engines.events import EngineEvent
from llmserve.errors import LLMServeError
from llmserve.serving.run import collect, run_on_engine
from llmserve.streaming.disconnect import DisconnectAwareStreamingResponse, until_disconnect
from llmserve.streaming.encoders import StreamEncoder
from llmserve.streaming.openai_format import full_response
from llmserve.validation.request import GenerationRequest

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def respond_whole(
    request: Request, engine: Engine, generation: GenerationRequest, limits: Limits
) -> Response:
    events = run_on_engine(engine, generation, limits.request_timeout_s)
    result = await until_disconnect(request, collect(events, generation))
    return json_response(200, full_response(generation, result))


async def respond_stream(
    request: Request,
    engine: Engine,
    generation: GenerationRequest,
    limits: Limits,
    encoder: StreamEncoder,
) -> Response:
    events = run_on_engine(engine, generation, limits.request_timeout_s)
    try:
        first = await until_disconnect(request, anext(events, None))
    except BaseException:
        await events.aclose()
        raise
    return DisconnectAwareStreamingResponse(
        _frames(first, events, encoder), media_type="text/event-stream", headers=SSE_HEADERS
    )


async def _frames(
    first: EngineEvent | None,
    events: AsyncGenerator[EngineEvent, None],
    encoder: StreamEncoder,
) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            for frame in encoder.encode(first):
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
        await events.aclose()
