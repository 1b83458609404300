"""Streaming over real sockets: incremental delivery, disconnects reaching the engine as aborts,
and the request timeout. "slow" emits 10 tokens/s after 50 ms, so a long request stays active."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from tests.conftest import RunningServer, serve, sim_engine, simulated_settings
from tests.support.errors import assert_openai_error
from tests.support.eventually import eventually
from tests.support.sse import Event, aiter_events, parse_events

from llmserve.config import Limits, Settings, SimulatedModel
from llmserve.engines.simulated import SimulatedEngine

CHAT = [{"role": "user", "content": "Tell me a long story."}]


async def wait_for_active(engine: SimulatedEngine) -> str:
    await eventually(lambda: len(engine.active) == 1, what="one active engine request")
    return next(iter(engine.active))


class AbortSpy:
    """Records every ``abort()`` the gateway sends an engine, whatever the engine does with it."""

    def __init__(self, engine: SimulatedEngine) -> None:
        self.calls: list[str] = []
        real = engine.abort

        async def abort(request_id: str) -> None:
            self.calls.append(request_id)
            await real(request_id)

        engine.abort = abort  # type: ignore[method-assign]


@pytest.fixture
def slow_aborts(sim_server: RunningServer) -> AbortSpy:
    return AbortSpy(sim_engine(sim_server, "slow"))


async def assert_aborted(
    engine: SimulatedEngine, spy: AbortSpy, request_id: str | None = None
) -> str:
    """The gateway aborted exactly one engine request (``request_id`` if given), and the engine's
    work for it stopped without completing."""
    await eventually(lambda: bool(spy.calls) and not engine.active, what="an abort, then idle")
    (aborted,) = spy.calls
    if request_id is not None:
        assert aborted == request_id
    assert engine.aborted == [aborted]  # the engine's own record agrees
    assert aborted not in engine.completed
    return aborted


def stream_body(path: str, model: str, max_tokens: int) -> dict[str, Any]:
    if path == "/generate":
        return {"model": model, "prompt": "story", "max_tokens": max_tokens}
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": True}
    if path == "/v1/chat/completions":
        body["messages"] = CHAT
    else:
        body["prompt"] = "story"
    return body


def token_text(payload: dict[str, Any]) -> str:
    """The generated text a frame carries, whichever of the three protocols it is."""
    if "token" in payload:
        return str(payload["token"])
    choice = payload["choices"][0]
    return str(choice.get("text") or choice.get("delta", {}).get("content") or "")


PATHS = ["/v1/chat/completions", "/v1/completions", "/generate"]


# --- incremental delivery ----------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_tokens_arrive_incrementally(
    sim_server: RunningServer, slow_aborts: AbortSpy, path: str
) -> None:
    engine = sim_engine(sim_server, "slow")
    arrivals: list[float] = []
    active_at_first_token: set[str] = set()
    async with httpx.AsyncClient(base_url=sim_server.url, timeout=10) as client:
        start = time.monotonic()
        async with client.stream("POST", path, json=stream_body(path, "slow", 6)) as response:
            assert response.status_code == 200
            async for event in aiter_events(response, complete=True):
                if event.event != "message" or event.done:
                    continue
                if token_text(event.json()):
                    if not arrivals:
                        active_at_first_token = set(engine.active)
                    arrivals.append(event.at - start)
    assert len(arrivals) == 6
    # 50 ms to the first token, then one every 100 ms: ~0.05 s, ..., ~0.55 s. Were the response
    # buffered, all six would arrive together at the end.
    assert arrivals[-1] - arrivals[0] > 0.3, arrivals
    assert len({round(t, 2) for t in arrivals}) >= 4, arrivals
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert sum(gap > 0.03 for gap in gaps) >= 3, gaps
    # The first token reached the client while the engine was still generating.
    assert len(active_at_first_token) == 1
    assert engine.completed == list(active_at_first_token)
    assert slow_aborts.calls == []


async def test_a_slow_stream_does_not_hold_up_other_requests(sim_server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=sim_server.url, timeout=10) as client:
        body = stream_body("/v1/completions", "slow", 20)
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            start = time.monotonic()
            other = await client.post(
                "/v1/completions", json={"model": "sim", "prompt": "x", "max_tokens": 2}
            )
            assert other.status_code == 200
            assert time.monotonic() - start < 1.5  # the stream has ~2 s to go
            # The other request finished while the slow one was still generating.
            assert len(sim_engine(sim_server, "slow").active) == 1
            assert len(sim_engine(sim_server, "sim").completed) == 1


# --- disconnects -------------------------------------------------------------------------------


async def leave_mid_stream(server: RunningServer, path: str) -> str:
    """Stream a long request on "slow", read one token, close the connection; the request id."""
    engine = sim_engine(server, "slow")
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        body = stream_body(path, "slow", 200)
        async with client.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            async for event in aiter_events(response):
                if token_text(event.json()):
                    break
            return await wait_for_active(engine)


@pytest.mark.parametrize("path", PATHS)
async def test_stream_disconnect_aborts_the_engine_request(
    sim_server: RunningServer, slow_aborts: AbortSpy, path: str
) -> None:
    request_id = await leave_mid_stream(sim_server, path)
    await assert_aborted(sim_engine(sim_server, "slow"), slow_aborts, request_id)


async def test_stream_disconnect_before_the_first_token_aborts() -> None:
    settings = Settings(
        models=[
            SimulatedModel(
                engine="simulated", name="late", tokens_per_second=10, first_token_latency_s=30
            )
        ],
        limits=Limits(),
    )
    async with serve(settings) as server:
        engine = sim_engine(server, "late")
        spy = AbortSpy(engine)
        # No status line comes before the first token, so the client gives up waiting for it.
        async with httpx.AsyncClient(base_url=server.url, timeout=0.3) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", json=stream_body("/v1/completions", "late", 5))
        await assert_aborted(engine, spy)


async def test_non_streaming_disconnect_aborts_the_engine_request(
    sim_server: RunningServer, slow_aborts: AbortSpy
) -> None:
    engine = sim_engine(sim_server, "slow")
    host, port = sim_server.url.removeprefix("http://").split(":")
    body = json.dumps({"model": "slow", "messages": CHAT, "max_tokens": 500}).encode()
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    await writer.drain()
    request_id = await wait_for_active(engine)
    await asyncio.sleep(0.2)  # a couple of tokens into the generation
    writer.close()
    await writer.wait_closed()
    await assert_aborted(engine, slow_aborts, request_id)


async def test_non_streaming_client_timeout_aborts_the_engine_request(
    sim_server: RunningServer, slow_aborts: AbortSpy
) -> None:
    async with httpx.AsyncClient(base_url=sim_server.url, timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                "/v1/completions", json={"model": "slow", "prompt": "x", "max_tokens": 500}
            )
    request_id = await assert_aborted(sim_engine(sim_server, "slow"), slow_aborts)
    assert request_id.startswith("cmpl-")


@pytest.mark.parametrize("stream", [True, False])
async def test_a_completed_request_is_not_aborted(sim_server: RunningServer, stream: bool) -> None:
    engine = sim_engine(sim_server, "sim")
    spy = AbortSpy(engine)
    body = {"model": "sim", "messages": CHAT, "max_tokens": 5, "stream": stream}
    async with httpx.AsyncClient(base_url=sim_server.url, timeout=10) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    if stream:
        request_id = parse_events(response.content)[0].json()["id"]
        assert response.text.endswith("data: [DONE]\n\n")
    else:
        request_id = response.json()["id"]
    await asyncio.sleep(0.1)  # an abort sent late would have landed by now
    assert engine.completed == [request_id]
    assert spy.calls == []
    assert engine.aborted == []
    assert engine.active == set()


# --- the request timeout -----------------------------------------------------------------------


@pytest.fixture
async def timeout_server() -> AsyncIterator[RunningServer]:
    async with serve(simulated_settings(request_timeout_s=0.3)) as running:
        yield running


@pytest.fixture
def timeout_aborts(timeout_server: RunningServer) -> AbortSpy:
    return AbortSpy(sim_engine(timeout_server, "slow"))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_stream_timeout_ends_with_in_band_error_then_done(
    timeout_server: RunningServer, timeout_aborts: AbortSpy, path: str
) -> None:
    events: list[Event] = []
    async with httpx.AsyncClient(base_url=timeout_server.url, timeout=10) as client:
        start = time.monotonic()
        async with client.stream("POST", path, json=stream_body(path, "slow", 100)) as response:
            assert response.status_code == 200
            events = [event async for event in aiter_events(response, complete=True)]
        elapsed = time.monotonic() - start
    assert elapsed < 3.0  # 0.3 s timeout; untimed it would take 10 s
    assert events[-1] == Event("[DONE]")
    error = assert_openai_error(events[-2].json(), type="server_error", code="request_timeout")
    assert error["param"] is None
    assert "Traceback" not in "".join(e.data for e in events)
    # Some tokens made it out before the timeout, and nothing follows the error but [DONE].
    chunks = [e.json() for e in events[:-2]]
    assert any(token_text(c) for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    await assert_aborted(sim_engine(timeout_server, "slow"), timeout_aborts, chunks[0]["id"])


async def test_generate_timeout_ends_with_error_event(
    timeout_server: RunningServer, timeout_aborts: AbortSpy
) -> None:
    async with httpx.AsyncClient(base_url=timeout_server.url, timeout=10) as client:
        response = await client.post("/generate", json=stream_body("/generate", "slow", 100))
    assert response.status_code == 200
    events = parse_events(response.content)
    assert events[-1].event == "error"
    assert_openai_error(events[-1].json(), code="request_timeout")
    assert [e.event for e in events[:-1]] == ["message"] * (len(events) - 1)
    assert len(events) > 1
    await assert_aborted(sim_engine(timeout_server, "slow"), timeout_aborts)


async def test_non_streaming_timeout_is_504(
    timeout_server: RunningServer, timeout_aborts: AbortSpy
) -> None:
    async with httpx.AsyncClient(base_url=timeout_server.url, timeout=10) as client:
        start = time.monotonic()
        response = await client.post(
            "/v1/chat/completions", json={"model": "slow", "messages": CHAT, "max_tokens": 100}
        )
        elapsed = time.monotonic() - start
    assert response.status_code == 504
    assert elapsed < 3.0  # 0.3 s timeout; untimed it would take 10 s
    error = assert_openai_error(response, 504, type="server_error", code="request_timeout")
    assert error["param"] is None
    request_id = await assert_aborted(sim_engine(timeout_server, "slow"), timeout_aborts)
    assert request_id.startswith("chatcmpl-")


async def test_timeout_does_not_touch_requests_that_finish_in_time(
    timeout_server: RunningServer, timeout_aborts: AbortSpy
) -> None:
    async with httpx.AsyncClient(base_url=timeout_server.url, timeout=10) as client:
        response = await client.post(
            "/v1/completions", json={"model": "slow", "prompt": "x", "max_tokens": 2}
        )
    assert response.status_code == 200
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert timeout_aborts.calls == []
    assert len(sim_engine(timeout_server, "slow").completed) == 1


async def test_timeout_before_the_first_token_is_a_real_504() -> None:
    settings = Settings(
        models=[
            SimulatedModel(
                engine="simulated", name="late", tokens_per_second=10, first_token_latency_s=5
            )
        ],
        limits=Limits(request_timeout_s=0.2),
    )
    async with serve(settings) as server:
        engine = sim_engine(server, "late")
        spy = AbortSpy(engine)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            response = await client.post(
                "/v1/completions", json=stream_body("/v1/completions", "late", 5)
            )
        assert_openai_error(response, 504, code="request_timeout")
        await assert_aborted(engine, spy)
