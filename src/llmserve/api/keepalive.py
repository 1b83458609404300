"""SSE comments while a stream's first event is slow to come (a queued request), so proxies
with idle timeouts keep the connection. Once one is sent the response has started (200):
whatever happens after that is answered in band."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from starlette.types import Message, Send

from llmserve.streaming import sse


class Opened:
    """Whether the response has started: after that, errors and disconnects stay in band."""

    yes = False


KEEPALIVE: Message = {
    "type": "http.response.body",
    "body": sse.comment("keep-alive"),
    "more_body": True,
}


class KeepAlive:
    """Opens the stream and sends SSE comments while the first event is slow to come (a queued
    request). A timer, and a task only once it fires: most requests never need either."""

    def __init__(
        self, send: Send, start: Callable[[], Message], interval_s: float, opened: Opened
    ) -> None:
        self._opened = opened
        self._send = send
        self._start = start
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(interval_s, self._fire)

    def _fire(self) -> None:
        self._task = asyncio.ensure_future(self._beat())

    async def _beat(self) -> None:
        with contextlib.suppress(OSError):
            self._opened.yes = True  # uvicorn writes the status line without waiting
            await self._send(self._start())
            while True:
                await self._send(KEEPALIVE)
                await asyncio.sleep(self._interval_s)

    async def stop(self) -> bool:
        """Stop; True if the response was opened (the status line is gone already)."""
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})  # not ``await task``: that would hide our own cancel
        return self._opened.yes
