"""The first-token and between-token deadlines of one upstream stream, on one timer."""

from __future__ import annotations

import asyncio

import aiohttp

from llmserve.engines.upstream.failures import interrupt


class Silence:
    """Closes the upstream response when no token arrives before ``deadline``. Each token moves
    the deadline with one float store; the timer re-arms itself lazily when it fires early, so a
    stream costs one timer, not one per token."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, deadline: float, response: aiohttp.ClientResponse
    ) -> None:
        self.deadline = deadline
        self.expired = False
        self._loop = loop
        self._response = response
        self._armed_at = deadline
        self._handle = loop.call_at(deadline, self._check)

    def move(self, deadline: float) -> None:
        self.deadline = deadline
        if deadline < self._armed_at:  # earlier than the timer: re-arm (the first token, once)
            self._handle.cancel()
            self._armed_at = deadline
            self._handle = self._loop.call_at(deadline, self._check)

    def end_soon(self, deadline: float) -> None:
        """A hard deadline, earlier or later than the current one."""
        self._handle.cancel()
        self.deadline = self._armed_at = deadline
        self._handle = self._loop.call_at(deadline, self._check)

    def _check(self) -> None:
        if self._loop.time() < self.deadline:
            self._armed_at = self.deadline
            self._handle = self._loop.call_at(self.deadline, self._check)
            return
        self.expired = True
        interrupt(self._response, TimeoutError())

    def cancel(self) -> None:
        self._handle.cancel()
