"""From a request's run (``serving.request_run``) to an HTTP response: one whole JSON body, or
an SSE stream, sent straight to the ASGI ``send``.

A stream's status is decided before its first byte where it can be: the first engine event is
awaited first, so a request refused by the queue or failing before its first token gets a real
status code. A request still waiting after one keep-alive interval gets its stream opened and
SSE keep-alive comments until its first event; any later error is an in-band SSE error event,
and the stream still ends cleanly. Whatever happens, ``RequestRun.close`` runs, and a client
that goes away stops the request wherever it is (``DisconnectWatch``).
"""

from __future__ import annotations

import contextlib
import logging

from starlette.requests import Request
from starlette.types import Message, Send

from llmserve.api.headers import rate_limit_headers
from llmserve.api.keepalive import KeepAlive, Opened
from llmserve.api.server_send import server_send
from llmserve.engines.events import EngineEvent, RawFrame, TextDelta
from llmserve.errors import ClientDisconnected, LLMServeError
from llmserve.serving.engine_request import collect
from llmserve.serving.request_run import RequestRun
from llmserve.streaming.disconnect import DisconnectWatch
from llmserve.streaming.encoders import StreamEncoder
from llmserve.streaming.openai_format import full_response
from llmserve.validation.request import ValidatedRequest
from llmserve.wire.errors import json_response

log = logging.getLogger(__name__)

# Events whose frames leave at once; the others (finish, usage) wait for the next or the end.
_SENT_AT_ONCE = (TextDelta, RawFrame)
_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",
}


async def respond(
    request: Request,
    send: Send,
    run: RequestRun,
    generation: ValidatedRequest,
    encoder: StreamEncoder | None,
    keepalive_s: float,
) -> None:
    """Answer with the run's result: a stream when ``encoder`` is given, else one JSON body.
    An error before the first byte is raised (the error handlers answer it, with its status),
    and so is ``ClientDisconnected`` for a client that left before it."""
    opened = Opened()
    try:
        with DisconnectWatch(request.receive) as watch:
            if encoder is None:
                result = await collect(run.events, generation)
                # Released before the answer leaves: a client that sends its next request on
                # receipt finds its concurrency slot free again.
                await run.close()
                opened.yes = True
                response = json_response(
                    200, full_response(generation, result), rate_limit_headers(run.quota)
                )
                await response(request.scope, request.receive, send)
            else:
                body_send = server_send(request.scope, send)
                await _stream(send, body_send, run, encoder, keepalive_s, opened)
    finally:
        await run.close()
    if watch.gone and not opened.yes:
        raise ClientDisconnected("the client disconnected")


async def _stream(
    send: Send,
    body_send: Send,
    run: RequestRun,
    encoder: StreamEncoder,
    keepalive_s: float,
    opened: Opened,
) -> None:
    """The start goes through ``send`` (every middleware sees it), the body through
    ``body_send``, the server's own (``api.server_send``)."""
    start: Message = {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in {**_SSE_HEADERS, **rate_limit_headers(run.quota)}.items()
        ],
    }
    keepalive = KeepAlive(send, lambda: start, keepalive_s, opened)
    try:
        first = await anext(run.events, None)
    except LLMServeError as exc:
        if not await keepalive.stop():
            raise  # nothing sent yet: the error handlers answer with the error's own status
        await _end(body_send, encoder.error(exc))
        return
    except BaseException:
        await keepalive.stop()
        raise
    if not await keepalive.stop():
        opened.yes = True
        await send(start)
    # A connection broken while sending is the same as a disconnect.
    with contextlib.suppress(OSError):
        # Frames that end a choice or the stream (finish, usage) wait for the next text or the
        # end, so the tail of a stream leaves in one write, not three: each write to a socket
        # costs the gateway more than building its frame.
        held: list[bytes] = []
        try:
            if first is not None:
                await _body(body_send, encoder.encode(first), held, first)
                async for event in run.events:
                    await _body(body_send, encoder.encode(event), held, event)
            await _end(body_send, held + encoder.end())
        except LLMServeError as exc:
            await _end(body_send, held + encoder.error(exc))
        except Exception:
            log.exception("a stream failed after it started")
            await _end(body_send, held + encoder.error(LLMServeError("internal server error")))


async def _body(send: Send, frames: list[bytes], held: list[bytes], event: EngineEvent) -> None:
    if not isinstance(event, _SENT_AT_ONCE):
        held += frames
    elif frames:
        if held:
            frames = held + frames
            held.clear()
        body = frames[0] if len(frames) == 1 else b"".join(frames)
        await send({"type": "http.response.body", "body": body, "more_body": True})


async def _end(send: Send, frames: list[bytes]) -> None:
    await send({"type": "http.response.body", "body": b"".join(frames), "more_body": False})
