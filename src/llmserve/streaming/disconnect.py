"""Client disconnects, noticed as events (``http.disconnect``), not by polling.

A disconnect cancels the work in hand; the engine request is then aborted by ``serving.run``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llmserve.errors import ClientDisconnected

T = TypeVar("T")


async def wait_for_disconnect(receive: Receive) -> None:
    # The body is already read, so the next message the server sends is http.disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ClientDisconnected.

    Two plain asyncio tasks rather than an anyio task group: this runs once per request, and a
    task group with its cancel scopes costs several times more."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({task})  # its cleanup (aborts, releases) has run
        watcher.cancel()
    if not task.cancelled() and task.exception() is None:
        return task.result()
    if watcher.done() and not watcher.cancelled():
        raise ClientDisconnected("the client disconnected")
    return task.result()  # raises the work's own error


class DisconnectAwareStreamingResponse(StreamingResponse):
    """A streaming response that always races its body against the client's disconnect.

    Starlette does this only for ASGI servers older than spec 2.4; newer ones are left to notice
    on the next failed send, which can be minutes away while a request waits in a queue.
    """

    def __init__(
        self,
        content: AsyncIterable[bytes],
        *,
        media_type: str,
        headers: Mapping[str, str],
        on_close: Callable[[], Awaitable[None]],
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Two plain tasks, not an anyio task group: a cancel scope's cancel formats the task's
        # repr, which is a measurable part of a short request's cost.
        body = asyncio.ensure_future(self._send_body(send))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({body, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            body.cancel()
            watcher.cancel()
            # Runs even when the body never started (a disconnect before the first send).
            with anyio.CancelScope(shield=True):
                await asyncio.wait({body, watcher})
                await self._on_close()
        if not body.cancelled():
            body.result()  # an error while streaming reaches the server's error handling

    async def _send_body(self, send: Send) -> None:
        # A connection broken while sending is the same as a disconnect.
        with contextlib.suppress(OSError):
            await self.stream_response(send)
