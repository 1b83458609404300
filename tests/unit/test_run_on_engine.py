"""run_on_engine at the engine seam, without sockets: the request deadline stops an engine
stalled before its first event or between two, as a 504 ``request_timeout``, and aborts the
engine request exactly once; a consumer that stops reading, or is cancelled (a client that
went away), aborts it too; a completed request is never aborted; the queue slot is always
given back. (The first-token and between-token timeouts of an upstream are the upstream
engine's own, tested over sockets in tests/routing.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator

import pytest
from tests.support.scripted_engine import (
    Delay,
    Handler,
    ScriptedEngine,
    Step,
    chat_request,
    read_until_error,
)

from llmserve.engines.events import ChoiceFinished, EngineEvent, TextDelta, UsageReport
from llmserve.errors import EngineFailure, EngineTimeout
from llmserve.scheduling.admission import Admission, Ticket
from llmserve.scheduling.queue_state import QueueLimits
from llmserve.serving.engine_request import run_on_engine
from llmserve.validation.request import ValidatedRequest

DEADLINE_S = 0.05
REQUEST = chat_request()
RID = REQUEST.request_id
A, B = TextDelta(0, "a", 1), TextDelta(0, "b", 1)
# An engine that stalls: far longer than any deadline here, short enough that a test which
# waits it out fails at once.
STALL = Delay(5)


class Ended:
    """A RunObserver that keeps how each run ended (what the access log and metrics say)."""

    def __init__(self) -> None:
        self.reports: list[BaseException | None] = []

    def admitted(self, waited_s: float) -> None:
        pass

    def observe(self, event: EngineEvent) -> None:
        pass

    def ended(self, error: BaseException | None) -> None:
        self.reports.append(error)


@pytest.fixture
def admission() -> Admission:
    return Admission(
        QueueLimits(max_waiting_requests=8, max_waiting_tokens=10_000, max_in_flight=1)
    )


def run(
    engine: ScriptedEngine, admission: Admission, timeout_s: float, observer: Ended | None = None
) -> AsyncGenerator[EngineEvent, None]:
    ticket = Ticket(RID, "tenant", 21, 5, timeout_s=5.0)
    return run_on_engine(engine, REQUEST, timeout_s, admission, ticket, observer)


async def read_all(
    events: AsyncIterator[EngineEvent],
) -> tuple[list[EngineEvent], BaseException | None]:
    return await read_until_error(events, Exception)


@pytest.mark.parametrize(
    ("script", "before"),
    [([STALL, A], []), ([A, STALL, B], [A])],
    ids=["before the first event", "between events"],
)
async def test_deadline_ends_a_stalled_engine_with_a_timeout_and_aborts_it_once(
    admission: Admission, script: list[Step], before: list[EngineEvent]
) -> None:
    engine = ScriptedEngine(lambda _: script)
    observer = Ended()
    started = time.monotonic()
    seen, error = await read_all(run(engine, admission, DEADLINE_S, observer))
    assert time.monotonic() - started < 1.0  # the stall was cut short, not waited out
    assert seen == before  # what came before the deadline reached the caller, nothing after
    assert isinstance(error, EngineTimeout)
    assert (error.status, error.code) == (504, "request_timeout")
    assert engine.aborts == [RID]  # by the deadline; not sent a second time on the way out
    assert observer.reports == [error]  # logged as a timeout, not as a disconnect
    assert admission.in_flight == 0


async def test_consumer_that_stops_reading_aborts_the_engine_request(
    admission: Admission,
) -> None:
    engine = ScriptedEngine(lambda _: [A, B, ChoiceFinished(0, "length")])
    events = run(engine, admission, 10.0)
    assert await anext(events) == A
    await events.aclose()
    assert engine.aborts == [RID]
    assert engine.closed_early == [RID]
    assert engine.completed == []
    assert admission.in_flight == 0


async def test_consumer_cancelled_while_the_engine_stalls_aborts_it(
    admission: Admission,
) -> None:
    waiting = asyncio.Event()

    async def script(_: ValidatedRequest) -> AsyncIterator[Step]:
        yield A
        waiting.set()  # the consumer asked for the next event
        yield STALL

    engine = ScriptedEngine(script)
    observer = Ended()
    seen: list[EngineEvent] = []

    async def consume() -> None:
        async for event in run(engine, admission, 10.0, observer):
            seen.append(event)

    task = asyncio.create_task(consume())
    await waiting.wait()
    task.cancel()  # what DisconnectWatch does when the client goes away
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [A]
    assert engine.aborts == [RID]
    assert engine.closed_early == [RID]
    assert len(observer.reports) == 1
    assert isinstance(observer.reports[0], asyncio.CancelledError)  # logged as a disconnect
    assert admission.in_flight == 0


async def test_completed_request_is_not_aborted(admission: Admission) -> None:
    script: list[Step] = [A, Delay(0.001), B, ChoiceFinished(0, "stop"), UsageReport(5, 2)]
    engine = ScriptedEngine(lambda _: script)
    observer = Ended()
    seen, error = await read_all(run(engine, admission, 10.0, observer))
    assert (seen, error) == ([A, B, ChoiceFinished(0, "stop"), UsageReport(5, 2)], None)
    assert engine.aborts == []
    assert engine.completed == [RID]
    assert observer.reports == [None]
    assert admission.in_flight == 0


FAILURE = EngineFailure("the engine failed", code="upstream_broken_stream")


def fails_at_once(_: ValidatedRequest) -> list[Step]:
    raise FAILURE


def fails_after_a(_: ValidatedRequest) -> Iterator[Step]:
    yield A
    raise FAILURE


@pytest.mark.parametrize(
    ("handler", "before"),
    [(fails_at_once, []), (fails_after_a, [A])],
    ids=["before the first event", "after it"],
)
async def test_engine_error_reaches_the_caller_as_it_was_and_frees_the_slot(
    admission: Admission, handler: Handler, before: list[EngineEvent]
) -> None:
    observer = Ended()
    seen, error = await read_all(run(ScriptedEngine(handler), admission, 10.0, observer))
    assert (seen, error) == (before, FAILURE)
    assert observer.reports == [FAILURE]
    assert admission.in_flight == 0
