"""RequestRun's accounting on every way a run ends, through the real rate limiter (in-memory
store, a clock that stands still) and the real admission queue: the key's concurrency slot and
queue slot come back, and of the tokens reserved (prompt + max_tokens) the key pays the prompt
(even when the engine never ran) and what was generated before the end; the rest is refunded.
tests/limits/test_release.py proves the same over sockets; these say exactly how many tokens
come back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from tests.support.scripted_engine import Delay, Handler, ScriptedEngine, Step, chat_request

from llmserve.auth.principal import Principal
from llmserve.config import RateLimitConfig
from llmserve.engines.events import ChoiceFinished, TextDelta, UsageReport
from llmserve.errors import EngineFailure, EngineUnavailable, LLMServeError, QueueFull
from llmserve.limits.limiter import RateLimiter
from llmserve.limits.store import MemoryStore
from llmserve.scheduling.admission import Admission, Ticket
from llmserve.scheduling.queue_state import QueueLimits
from llmserve.serving.record import RequestRecord
from llmserve.serving.request_run import RequestRun
from llmserve.validation.request import ValidatedRequest

TPM = 1000
PROMPT, MAX_TOKENS = 40, 200
COST = PROMPT + MAX_TOKENS
KEY = Principal("team", tpm=TPM, max_concurrent=1)
REQUEST = chat_request(prompt_tokens=PROMPT, max_tokens=MAX_TOKENS)


def word(text: str) -> TextDelta:
    return TextDelta(0, text, 1)


class Gate:
    """The real limiter and admission queue of one model, for one key."""

    def __init__(self) -> None:
        self.limiter = RateLimiter(MemoryStore(clock=lambda: 0.0), RateLimitConfig())
        self.admission = Admission(
            QueueLimits(max_waiting_requests=8, max_waiting_tokens=10_000, max_in_flight=1)
        )

    async def start(self, handler: Handler) -> tuple[RequestRun, ScriptedEngine]:
        engine = ScriptedEngine(handler)
        rid = REQUEST.request_id
        reservation = await self.limiter.reserve(KEY, COST, rid)
        assert reservation is not None
        assert reservation.quota.remaining_tokens == TPM - COST
        ticket = Ticket(rid, KEY.tenant, COST, PROMPT, timeout_s=5.0)
        record = RequestRecord(REQUEST, KEY.name)
        run = RequestRun(
            engine, REQUEST, 10.0, self.admission, ticket, self.limiter, reservation, record
        )
        return run, engine

    async def tokens_left(self) -> int:
        """What the key has left: reserving the next request must succeed, which it can only
        once the run gave its concurrency slot back."""
        probe = await self.limiter.reserve(KEY, 1, "probe")
        assert probe is not None, "the key is not limited"
        await self.limiter.release(probe, 0)  # its token back: the probe used none
        assert probe.quota.remaining_tokens is not None
        return probe.quota.remaining_tokens + 1


@pytest.fixture
def gate() -> Gate:
    return Gate()


async def read(run: RequestRun) -> LLMServeError | None:
    try:
        async for _ in run.events:
            pass
    except LLMServeError as exc:
        return exc
    return None


async def test_success_refunds_what_was_not_generated(gate: Gate) -> None:
    script: list[Step] = [word("a"), word("b"), word("c"), ChoiceFinished(0, "stop")]
    run, _ = await gate.start(lambda _: [*script, UsageReport(PROMPT, 3)])
    assert await read(run) is None
    await run.close()
    assert await gate.tokens_left() == TPM - PROMPT - 3
    assert gate.admission.in_flight == 0
    assert run.record.status == "ok"


async def test_engine_usage_report_is_what_the_key_pays(gate: Gate) -> None:
    # The engine's own count wins over the deltas (one delta may carry several tokens).
    run, _ = await gate.start(lambda _: [TextDelta(0, "abc", 1), UsageReport(PROMPT, 7)])
    assert await read(run) is None
    await run.close()
    assert await gate.tokens_left() == TPM - PROMPT - 7


async def test_engine_error_before_the_first_event_charges_only_the_prompt(gate: Gate) -> None:
    down = EngineUnavailable("engine down")

    def refuse(_: ValidatedRequest) -> list[Step]:
        raise down

    run, _ = await gate.start(refuse)
    assert await read(run) is down
    await run.close()
    assert await gate.tokens_left() == TPM - PROMPT
    assert gate.admission.in_flight == 0
    assert run.record.status == "engine_error"


async def test_engine_error_after_events_charges_what_was_generated(gate: Gate) -> None:
    broken = EngineFailure("stream broke", code="upstream_broken_stream")

    def breaks(_: ValidatedRequest) -> Iterator[Step]:
        yield word("a")
        yield word("b")
        raise broken

    run, _ = await gate.start(breaks)
    assert await read(run) is broken
    await run.close()
    assert await gate.tokens_left() == TPM - PROMPT - 2
    assert gate.admission.in_flight == 0
    assert run.record.status == "engine_error"


async def test_cancelled_run_aborts_the_engine_and_charges_what_was_generated(
    gate: Gate,
) -> None:
    stalled = asyncio.Event()

    async def script(_: ValidatedRequest) -> AsyncIterator[Step]:
        yield word("a")
        yield word("b")
        stalled.set()  # both words were read; the consumer waits for the next
        yield Delay(5)
        yield word("c")

    run, engine = await gate.start(script)

    async def consume() -> None:
        async for _ in run.events:
            pass

    task = asyncio.create_task(consume())
    await stalled.wait()
    task.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await task
    await run.close()
    assert engine.aborts == [REQUEST.request_id]
    assert await gate.tokens_left() == TPM - PROMPT - 2
    assert gate.admission.in_flight == 0
    assert run.record.status == "disconnect"


async def test_run_closed_before_it_started_never_reaches_the_engine(gate: Gate) -> None:
    # The client went away before the response began: nothing queued, nothing generated.
    run, engine = await gate.start(lambda _: [word("a")])
    await run.close()
    assert engine.calls == []
    assert await gate.tokens_left() == TPM - PROMPT
    assert gate.admission.in_flight == gate.admission.queued == 0
    assert run.record.status == "disconnect"


async def test_run_the_queue_refused_never_reaches_the_engine(gate: Gate) -> None:
    gate.admission = Admission(
        QueueLimits(max_waiting_requests=0, max_waiting_tokens=10_000, max_in_flight=1)
    )
    other = await gate.admission.acquire(Ticket("other", "other", 10, 5, timeout_s=5.0))
    run, engine = await gate.start(lambda _: [word("a")])
    refused = await read(run)
    await run.close()
    other.release()
    assert isinstance(refused, QueueFull) and refused.status == 503
    assert engine.calls == []
    assert await gate.tokens_left() == TPM - PROMPT
    assert run.record.status == "queue_full"
