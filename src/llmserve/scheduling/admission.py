"""The async face of ``QueueState``: one ``Admission`` per model.

``acquire`` waits for a slot and returns a ``Permit``; the permit is released exactly once on
every exit path (it is a context manager, and ``run_on_engine`` holds it for the whole request).
A waiter whose client goes away is cancelled, which takes it out of the queue at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from llmserve.errors import QueueFull, QueueTimeout
from llmserve.scheduling.queue_state import Entry, QueueLimits, QueueState, Rejected

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Ticket:
    """What admission needs to know about a request."""

    request_id: str
    tenant: str
    cost: int
    prompt_tokens: int
    timeout_s: float
    weight: float = 1.0
    priority: int = 0


class Permit:
    """A running slot; ``release`` is idempotent."""

    def __init__(self, admission: Admission, entry_id: str, waited_s: float) -> None:
        self._admission = admission
        self._entry_id = entry_id
        self.waited_s = waited_s
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._finish(self._entry_id)

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class Admission:
    def __init__(self, limits: QueueLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.state = QueueState(limits)
        self._clock = clock
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.draining = False

    @property
    def in_flight(self) -> int:
        return len(self.state.running)

    @property
    def queued(self) -> int:
        return len(self.state.waiting)

    async def acquire(self, ticket: Ticket) -> Permit:
        """Wait for a slot. Raises QueueFull at once when the queue is full (or draining), and
        QueueTimeout when the ticket's timeout passes while it waits."""
        now = self._clock()
        if self.draining:
            raise QueueFull("the server is shutting down", retry_after_s=5, code="draining")
        entry = Entry(
            ticket.request_id,
            ticket.tenant,
            ticket.cost,
            ticket.prompt_tokens,
            now,
            now + ticket.timeout_s,
            ticket.weight,
            ticket.priority,
        )
        rejected = self.state.offer(entry, now)
        if isinstance(rejected, Rejected):
            raise _full(rejected)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[entry.id] = waiter
        self._dispatch()
        try:
            await waiter
        except BaseException:
            self._waiters.pop(entry.id, None)
            if self.state.remove(entry.id) is None and entry.id in self.state.running:
                # Admitted in the same instant it was cancelled: give the slot back.
                self._finish(entry.id)
            raise
        return Permit(self, entry.id, self._clock() - now)

    def _finish(self, entry_id: str) -> None:
        self.state.finish(entry_id, self._clock())
        self._dispatch()

    def _dispatch(self) -> None:
        now = self._clock()
        for late in self.state.expired(now):
            waiter = self._waiters.pop(late.id, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(
                    QueueTimeout(
                        f"the request waited {now - late.enqueued_at:.1f} s in the queue without "
                        "reaching the engine",
                        retry_after_s=self.state.retry_after(now),
                    )
                )
        handed_back = True
        while handed_back:  # a slot given to a waiter that already left is offered again
            handed_back = False
            for entry in self.state.pop_ready(now):
                waiter = self._waiters.pop(entry.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
                else:  # cancelled in this same loop turn: nobody waits for it any more
                    self.state.unadmit(entry.id)
                    handed_back = True
        self._schedule_wakeup(now)

    def _schedule_wakeup(self, now: float) -> None:
        """Deadlines and grouping windows need a call even when nothing else happens."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        times = [t for t in (self.state.next_deadline(), self.state.next_wakeup()) if t is not None]
        if times:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(min(times) - now, 0.0) + 1e-3, self._dispatch)


def _full(rejected: Rejected) -> QueueFull:
    what = "requests" if rejected.reason == "queue_full" else "tokens"
    return QueueFull(
        f"the server is at capacity (too many {what} waiting); retry after "
        f"{rejected.retry_after_s} s",
        retry_after_s=rejected.retry_after_s,
        code=rejected.reason,
    )
