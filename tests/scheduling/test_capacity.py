"""Admission over a real server: bursts beyond capacity, queue deadlines, clients leaving the
queue, keep-alives while a stream waits, and no leaked slots, tokens or waiters afterwards."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import pytest

from llmserve.config import Limits, Settings
from llmserve.engines.events import EngineEvent
from llmserve.engines.simulated import SimulatedEngine
from llmserve.validation.request import ValidatedRequest
from tests.conftest import serve, sim_engine
from tests.scheduling.helpers import (
    RawRequest,
    assert_idle,
    assert_overloaded,
    completion,
    model,
    settings,
    stream_request,
)
from tests.support.errors import assert_openai_error
from tests.support.eventually import eventually
from tests.support.sse import Comment, Event, aiter_events, aiter_sse

PATH = "/v1/completions"


def track_peak(engine: SimulatedEngine) -> list[int]:
    """The most engine requests ever active at once (a one-item list, updated in place)."""
    peak = [0]
    real = engine.generate

    async def generate(request: ValidatedRequest) -> AsyncGenerator[EngineEvent, None]:
        async for event in real(request):
            peak[0] = max(peak[0], len(engine.active))
            yield event

    engine.generate = generate  # type: ignore[method-assign]
    return peak


# --- a burst beyond capacity -------------------------------------------------------------------

# 2 running + 3 waiting = 5 admitted of 10. Each takes 0.5 s + 15 x 0.05 s = 1.25 s on the engine,
# so the five admitted need three rounds (~3.75 s), and no admitted request, running or waiting,
# can be answered in full before 1.25 s: a rejection must come well before that.
BURST = model(
    "burst",
    tokens_per_second=20,
    first_token_latency_s=0.5,
    max_in_flight=2,
    max_waiting_requests=3,
)
BURST_TOKENS = 16


async def test_burst_beyond_capacity_rejects_the_excess_at_once() -> None:
    async with serve(settings(BURST)) as server:
        peak = track_peak(sim_engine(server, "burst"))
        async with httpx.AsyncClient(base_url=server.url, timeout=15) as client:
            start = time.monotonic()

            async def one() -> tuple[httpx.Response, float]:
                response = await client.post(PATH, json=completion("burst", BURST_TOKENS))
                return response, time.monotonic() - start

            results = await asyncio.gather(*(one() for _ in range(10)))

        assert Counter(r.status_code for r, _ in results) == {200: 5, 503: 5}
        rejected = [t for r, t in results if r.status_code == 503]
        served = [t for r, t in results if r.status_code == 200]
        for response, _ in results:
            if response.status_code == 503:
                assert_overloaded(response, "queue_full")
            else:
                assert response.json()["usage"]["completion_tokens"] == BURST_TOKENS
        # Rejections are immediate (~0.1 s; 1 s allows for a loaded machine): all of them well
        # before even the first admitted request is done.
        assert max(rejected) < 1.0, rejected
        assert min(served) >= 1.2, served
        # The three waiting requests ran after the first two, never beside them.
        assert max(served) > 3.5, served
        assert peak == [2]
        assert_idle(server.models.admission("burst"))


async def test_streaming_burst_rejects_with_a_status_before_any_stream_byte() -> None:
    async with serve(settings(BURST)) as server:
        peak = track_peak(sim_engine(server, "burst"))
        async with httpx.AsyncClient(base_url=server.url, timeout=15) as client:
            start = time.monotonic()
            body = completion("burst", BURST_TOKENS, stream=True)
            results = await asyncio.gather(*(stream_request(client, PATH, body) for _ in range(10)))

        assert Counter(r.status for r in results) == {200: 5, 503: 5}
        rejected = [r for r in results if r.status == 503]
        served = [r for r in results if r.status == 200]
        for result in rejected:
            # A real status code and a JSON error, not a 200 with an in-band SSE error.
            assert_overloaded(result, "queue_full")
        for result in served:
            assert result.headers["content-type"].startswith("text/event-stream")
            assert result.token_chunks == BURST_TOKENS
            assert result.done
            assert result.error is None
        # Rejected at once (~0.1 s; 1 s allows for a loaded machine), long before any admitted
        # stream could end. The three waiting streams get their status only once a slot frees.
        latest_rejection = max(r.ended for r in rejected) - start
        assert latest_rejection < 1.0
        assert latest_rejection < min(r.ended for r in served) - start - 0.2
        assert sorted(r.started - start for r in served)[2] > 1.2
        assert max(r.ended for r in served) - start > 3.5
        assert peak == [2]
        assert_idle(server.models.admission("burst"))


# --- queue deadlines ---------------------------------------------------------------------------

# One slot; a 30-token request holds it ~1.5 s. "short" has a 0.3 s queue timeout of its own.
QUEUED = model("q", tokens_per_second=20, max_in_flight=1)
SHORT = model("short", tokens_per_second=20, max_in_flight=1, queue_timeout_s=0.3)
BLOCKER_TOKENS = 30


async def test_queue_timeout_header_rejects_a_request_that_waits_too_long() -> None:
    async with serve(settings(QUEUED)) as server:
        engine = sim_engine(server, "q")
        admission = server.models.admission("q")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            blocker = asyncio.create_task(client.post(PATH, json=completion("q", BLOCKER_TOKENS)))
            await eventually(lambda: admission.in_flight == 1)
            started_before = len(engine.started)
            assert started_before == 1

            header = {"X-Queue-Timeout": "0.2"}
            t0 = time.monotonic()
            whole = await client.post(PATH, json=completion("q", 5), headers=header)
            waited = time.monotonic() - t0
            assert_overloaded(whole, "queue_timeout")
            assert 0.15 <= waited < 1.0, waited

            t0 = time.monotonic()
            streamed = await stream_request(
                client, PATH, completion("q", 5, stream=True), headers=header
            )
            assert_overloaded(streamed, "queue_timeout")
            assert 0.15 <= streamed.ended - t0 < 1.0

            # Both gave up while the blocker still held the slot, and neither reached the engine.
            assert admission.in_flight == 1
            assert admission.queued == 0
            assert len(engine.started) == started_before
            done = await blocker
            assert done.status_code == 200
        await asyncio.sleep(0.2)  # a timed-out entry dispatched late would have started by now
        assert engine.started == {done.json()["id"]}
        assert engine.aborted == []
        assert_idle(admission)


async def test_the_model_queue_timeout_caps_the_header() -> None:
    async with serve(settings(SHORT)) as server:
        engine = sim_engine(server, "short")
        admission = server.models.admission("short")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            blocker = asyncio.create_task(
                client.post(PATH, json=completion("short", BLOCKER_TOKENS))
            )
            await eventually(lambda: admission.in_flight == 1)
            # A longer header cannot extend the model's 0.3 s limit; no header means that limit.
            for headers in ({"X-Queue-Timeout": "30"}, {}):
                t0 = time.monotonic()
                response = await client.post(PATH, json=completion("short", 5), headers=headers)
                waited = time.monotonic() - t0
                assert_overloaded(response, "queue_timeout")
                assert 0.25 <= waited < 1.2, (headers, waited)
            assert admission.in_flight == 1  # the blocker is still running
            assert (await blocker).status_code == 200
        assert len(engine.started) == 1
        assert_idle(admission)


async def test_an_invalid_queue_timeout_header_is_400() -> None:
    async with serve(settings(QUEUED)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            for value in ("abc", "-1", "0", "nan", ""):
                for stream in (False, True):
                    response = await client.post(
                        PATH,
                        json=completion("q", 5, stream=stream),
                        headers={"X-Queue-Timeout": value},
                    )
                    assert response.status_code == 400, (value, stream, response.text)
                    assert_openai_error(
                        response, 400, type="invalid_request_error", param="x-queue-timeout"
                    )
        assert sim_engine(server, "q").started == set()
        assert_idle(server.models.admission("q"))


# --- clients leaving the queue -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["whole", "stream-before-status", "stream-after-keepalive"])
async def test_a_client_that_leaves_while_queued_leaves_the_queue_at_once(how: str) -> None:
    # With 0.2 s keep-alives a waiting stream has its 200 and comments before it leaves;
    # with 10 s ones it leaves while the status line is still being held back.
    keepalive = 0.2 if how == "stream-after-keepalive" else 10.0
    async with serve(settings(QUEUED, keepalive_interval_s=keepalive)) as server:
        engine = sim_engine(server, "q")
        admission = server.models.admission("q")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            blocker = asyncio.create_task(client.post(PATH, json=completion("q", BLOCKER_TOKENS)))
            await eventually(lambda: admission.in_flight == 1)
            body = completion("q", 5, stream=how != "whole")
            if how == "stream-after-keepalive":
                async with client.stream("POST", PATH, json=body) as response:
                    assert response.status_code == 200
                    async for item in aiter_sse(response):
                        if isinstance(item, Comment):
                            break  # a keep-alive came: the request is still queued; leave
                    assert admission.queued == 1
            else:
                raw = RawRequest(server.url, PATH, body, {})
                await raw.send()
                await eventually(lambda: admission.queued == 1)
                await asyncio.sleep(0.1)
                await raw.close()
            took = await eventually(lambda: admission.queued == 0, within=1.0)
            assert took < 1.0
            # It left the queue; it did not take the slot when that freed up.
            assert admission.in_flight == 1
            done = await blocker
            assert done.status_code == 200
        await asyncio.sleep(0.2)
        assert engine.started == {done.json()["id"]}
        assert engine.aborted == []
        assert_idle(admission)


# --- keep-alives while a stream waits ----------------------------------------------------------


async def test_a_queued_stream_gets_keepalive_comments_then_its_tokens() -> None:
    async with serve(settings(QUEUED, keepalive_interval_s=0.2)) as server:
        admission = server.models.admission("q")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            blocker = asyncio.create_task(client.post(PATH, json=completion("q", BLOCKER_TOKENS)))
            await eventually(lambda: admission.in_flight == 1)
            t0 = time.monotonic()
            result = await stream_request(client, PATH, completion("q", 5, stream=True))
            assert (await blocker).status_code == 200

        assert result.status == 200
        assert result.headers["content-type"].startswith("text/event-stream")
        # The status came after one keep-alive interval (0.2 s), not after the ~1.5 s queue wait.
        assert result.started - t0 < 1.0
        first_data = next(i for i, f in enumerate(result.frames) if isinstance(f, Event))
        waiting = result.frames[:first_data]
        # ~1.5 s in the queue at one comment per 0.2 s after the first: several, never fewer
        # than three even on a loaded machine.
        assert len(waiting) >= 3, result.frames
        assert all(isinstance(frame, Comment) for frame in waiting), waiting
        first_data_at = result.frames[first_data].at
        assert first_data_at - t0 > 1.0  # it really did wait behind the blocker
        # Then an ordinary stream: five tokens, a finish reason, [DONE], nothing after it.
        assert result.token_chunks == 5
        assert result.chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert result.done
        assert result.frames[-1] == Event("[DONE]")
        assert result.error is None
        assert_idle(admission)


# --- nothing leaks -----------------------------------------------------------------------------

# "mix": one slot, two waiting places. "tok": one slot, 40 waiting tokens; a request costs its
# prompt + max_tokens, so one 20-token request may wait there, a second may not.
MIX = model("mix", tokens_per_second=20, max_in_flight=1, max_waiting_requests=2)
TOK = model("tok", tokens_per_second=50, max_in_flight=1, max_waiting_tokens=40)


async def test_no_slot_token_or_waiter_leaks_after_every_kind_of_ending() -> None:
    async with serve(settings(MIX, TOK, keepalive_interval_s=0.2)) as server:
        mix = server.models.admission("mix")
        tok = server.models.admission("tok")
        endings: Counter[str] = Counter()
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:

            def post(name: str, tokens: int, **kw: Any) -> asyncio.Task[httpx.Response]:
                return asyncio.create_task(client.post(PATH, json=completion(name, tokens), **kw))

            running = post("mix", BLOCKER_TOKENS)
            await eventually(lambda: mix.in_flight == 1)
            waiting = post("mix", 3)
            await eventually(lambda: mix.queued == 1)
            late = post("mix", 3, headers={"X-Queue-Timeout": "0.3"})
            await eventually(lambda: mix.queued == 2)

            full = await client.post(PATH, json=completion("mix", 3))
            assert_overloaded(full, "queue_full")
            endings["queue_full"] += 1
            assert_overloaded(await late, "queue_timeout")
            endings["queue_timeout"] += 1

            # Leaves while queued, before its status line.
            raw = RawRequest(server.url, PATH, completion("mix", 3), {})
            await raw.send()
            await eventually(lambda: mix.queued == 2)
            await raw.close()
            await eventually(lambda: mix.queued == 1)
            endings["left_queued"] += 1

            # Leaves while queued, after its stream opened with keep-alives.
            async with client.stream("POST", PATH, json=completion("mix", 3, stream=True)) as r:
                assert r.status_code == 200
                async for item in aiter_sse(r):
                    if isinstance(item, Comment):
                        break
            await eventually(lambda: mix.queued == 1)
            endings["left_stream_queued"] += 1

            bad = await client.post(
                PATH, json=completion("mix", 3), headers={"X-Queue-Timeout": "x"}
            )
            assert bad.status_code == 400
            endings["invalid"] += 1

            assert (await running).status_code == 200
            assert (await waiting).status_code == 200
            endings["completed"] += 2

            # Leaves mid-stream, while running on the engine.
            async with client.stream("POST", PATH, json=completion("mix", 100, stream=True)) as r:
                assert r.status_code == 200
                async for _ in aiter_events(r):
                    break
            await eventually(lambda: mix.in_flight == 0)
            endings["left_running"] += 1

            # Too many tokens waiting.
            tok_running = post("tok", 40)
            await eventually(lambda: tok.in_flight == 1)
            tok_waiting = post("tok", 20)
            await eventually(lambda: tok.queued == 1)
            too_big = await client.post(PATH, json=completion("tok", 20))
            assert_overloaded(too_big, "queue_tokens_full")
            endings["queue_tokens_full"] += 1
            assert (await tok_running).status_code == 200
            assert (await tok_waiting).status_code == 200
            endings["completed"] += 2

        assert len(endings) == 8
        mix_engine = sim_engine(server, "mix")
        await eventually(lambda: not mix_engine.active)
        assert len(mix_engine.aborted) == 1  # the one that left mid-stream
        assert len(mix_engine.completed) == 2
        for name in server.models.names:
            assert_idle(server.models.admission(name))
            assert sim_engine(server, name).active == set()


# --- the waiting room of size zero ------------------------------------------------------------

NO_ROOM = model("noroom", tokens_per_second=20, max_in_flight=2, max_waiting_requests=0)


async def test_a_zero_waiting_room_still_serves_while_slots_are_free() -> None:
    async with serve(settings(NO_ROOM)) as server:
        admission = server.models.admission("noroom")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            alone = await client.post(PATH, json=completion("noroom", 3))
            assert alone.status_code == 200, alone.text
            burst = await asyncio.gather(
                *(client.post(PATH, json=completion("noroom", 10)) for _ in range(4))
            )
        # Both slots are used; nothing may wait, so the other two are turned away at once.
        assert Counter(r.status_code for r in burst) == {200: 2, 503: 2}
        for response in burst:
            if response.status_code == 503:
                assert_overloaded(response, "queue_full")
        assert_idle(admission)


# --- the request timeout covers the queue wait -------------------------------------------------

# Every request, queue wait included, must end within request_timeout_s (config.Limits). One slot
# is kept busy by a steady supply of urgent (priority 0) requests of ~0.2 s each; a less urgent
# one (priority 5) waits behind them. The model's queue timeout is the default 60 s.
DEADLINE = model("deadline", tokens_per_second=20, max_in_flight=1)


async def test_the_request_timeout_ends_a_request_still_waiting_in_the_queue() -> None:
    request_timeout_s = 1.0
    feed_for_s = 3.0
    s = Settings(models=[DEADLINE], limits=Limits(request_timeout_s=request_timeout_s))
    async with serve(s) as server:
        engine = sim_engine(server, "deadline")
        admission = server.models.admission("deadline")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            stop = time.monotonic() + feed_for_s
            urgent: list[asyncio.Task[httpx.Response]] = []

            async def feed() -> None:
                # Keep urgent requests queued at all times (one running, up to two waiting), each
                # done well within the timeout.
                while time.monotonic() < stop:
                    if sum(not t.done() for t in urgent) < 3:
                        urgent.append(
                            asyncio.create_task(client.post(PATH, json=completion("deadline", 4)))
                        )
                    await asyncio.sleep(0.02)

            feeder = asyncio.create_task(feed())
            await eventually(lambda: admission.in_flight == 1 and admission.queued == 1)
            started_before = set(engine.started)
            t0 = time.monotonic()
            late = await client.post(PATH, json=completion("deadline", 4, priority=5))
            ended = time.monotonic() - t0
            await feeder
            responses = await asyncio.gather(*urgent)

        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        # It ends with a timeout error at its deadline, not when the urgent supply dries up...
        assert late.status_code in (503, 504), late.text
        assert ended < request_timeout_s + 0.6, ended
        # ...and a request past its deadline is never handed to the engine.
        assert assert_openai_error(late)["code"] in ("queue_timeout", "request_timeout")
        assert set(engine.started) - started_before <= {r.json()["id"] for r in responses}
