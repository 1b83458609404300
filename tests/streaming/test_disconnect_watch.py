"""DisconnectWatch: a client's disconnect stops the request's own task where it waits, and
only that: any other cancellation (shutdown, a deadline) still cancels the task."""

from __future__ import annotations

import asyncio

import pytest

from llmserve.streaming.disconnect import DisconnectWatch


class Client:
    """An ASGI receive channel whose http.disconnect arrives when ``leave`` is called."""

    def __init__(self) -> None:
        self._left = asyncio.Event()
        self.calls = 0

    def leave(self) -> None:
        self._left.set()

    async def receive(self) -> dict[str, str]:
        self.calls += 1
        await self._left.wait()
        return {"type": "http.disconnect"}


async def test_a_disconnect_stops_the_wait_and_the_task_goes_on() -> None:
    client = Client()
    after: list[str] = []

    async def request() -> bool:
        with DisconnectWatch(client.receive) as watch:
            await asyncio.sleep(30)  # the queue, the engine, a send
            after.append("not reached")
        # Taken back: the task is not "being cancelled" (asyncio.timeout and the like rely on
        # it), and cleanup can await.
        current = asyncio.current_task()
        assert current is not None and current.cancelling() == 0
        await asyncio.sleep(0)
        after.append("cleanup ran")
        return watch.gone

    task = asyncio.create_task(request())
    await asyncio.sleep(0.01)
    client.leave()
    assert await asyncio.wait_for(task, 2) is True
    assert after == ["cleanup ran"]


async def test_without_a_disconnect_nothing_is_cancelled_and_the_watcher_stops() -> None:
    client = Client()
    with DisconnectWatch(client.receive) as watch:
        await asyncio.sleep(0.01)
    client.leave()  # after the block: nobody is cancelled
    await asyncio.sleep(0.01)
    assert not watch.gone
    assert client.calls == 1


async def test_another_cancellation_is_not_taken_for_a_disconnect() -> None:
    client = Client()

    async def request() -> None:
        with DisconnectWatch(client.receive):
            await asyncio.sleep(30)

    task = asyncio.create_task(request())
    await asyncio.sleep(0.01)
    task.cancel()  # e.g. the server shutting down
    with pytest.raises(asyncio.CancelledError):
        await task
