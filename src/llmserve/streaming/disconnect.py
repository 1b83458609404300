"""Client disconnects, noticed as events (``http.disconnect``), not by polling.

One watcher task per request: when the client goes away while the request's own task is inside
a ``DisconnectWatch``, that task is cancelled once, wherever it waits (the queue, the engine, a
send). The engine request is then aborted by ``serving.run`` and everything else is released by
``RequestRun.close``.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from starlette.types import Receive


async def wait_for_disconnect(receive: Receive) -> None:
    # The body is already read, so the next message the server sends is http.disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


class DisconnectWatch:
    """While inside it, a client disconnect cancels the current task; on the way out that
    cancellation is taken back and swallowed (the task goes on), and ``gone`` says it happened.

    One plain task and a done-callback, not a task per awaited step: this runs for every
    request, and tasks, ``asyncio.wait`` and anyio task groups each cost more than the rest of
    the bookkeeping together. The task is cancelled at most once, so cleanup that runs after the
    cancellation (shielded or not) is never interrupted again.
    """

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Future[None] | None = None
        self._inside = False
        self.gone = False

    def __enter__(self) -> DisconnectWatch:
        self._task = asyncio.current_task()
        self._inside = True
        self._watcher = asyncio.ensure_future(wait_for_disconnect(self._receive))
        self._watcher.add_done_callback(self._seen)
        return self

    def _seen(self, watcher: asyncio.Future[None]) -> None:
        if watcher.cancelled() or watcher.exception() is not None:
            return
        self.gone = True
        if self._inside and self._task is not None:
            self._task.cancel()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        self._inside = False
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
        if self.gone and self._task is not None and self._task.cancelling():
            self._task.uncancel()  # ours: the task itself was not asked to stop
            return isinstance(exc, asyncio.CancelledError)
        return False
