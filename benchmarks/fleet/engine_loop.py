"""The replica's one engine loop: plays the pure ``SimEngine`` against the wall clock and hands
each request's tokens to the handler streaming it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from benchmarks.fleet.engine import Emission, SimEngine, SimRequest


class EngineLoop:
    def __init__(self, engine: SimEngine, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self._clock = clock
        self._streams: dict[SimRequest, asyncio.Queue[Emission]] = {}
        self._wake = asyncio.Event()

    def submit(self, request: SimRequest) -> asyncio.Queue[Emission]:
        queue: asyncio.Queue[Emission] = asyncio.Queue()
        self._streams[request] = queue
        self.engine.submit(request, self._clock())
        self._wake.set()
        return queue

    def abort(self, request: SimRequest) -> None:
        if self._streams.pop(request, None) is not None:
            self.engine.abort(request, self._clock())
            self._wake.set()

    async def run(self) -> None:
        while True:
            due = self.engine.next_event_s()
            wait = None if due is None else due - self._clock()
            if wait is None or wait > 0:
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                self._wake.clear()
            for emission in self.engine.advance(self._clock()):
                queue = self._streams.get(emission.request)
                if queue is not None:
                    queue.put_nowait(emission)
                if emission.finished:
                    self._streams.pop(emission.request, None)
