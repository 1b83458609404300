"""The OpenAI-compatible upstream engine, end to end over real loopback sockets.

Gateway B serves model "up" through ``UpstreamEngine``; its upstream is gateway A serving the
deterministic simulated engine (or, for failure modes, the fake upstream of tests/support).
Everything runs in one event loop on 127.0.0.1: A, B, the fake upstreams and the clients.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import orjson
import pytest
import pytest_asyncio
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from llmserve.config import Settings, UpstreamModel
from llmserve.engines.simulated import SimulatedEngine
from tests.conftest import sim_engine, simulated_settings
from tests.support.eventually import eventually
from tests.support.fake_upstream import (
    HANG_AFTER_HEADERS,
    HANG_BEFORE_HEADERS,
    FakeUpstream,
    Mode,
    answer,
    chat_chunk,
    sse_frames,
)
from tests.support.gateway import RunningServer, free_port, serve
from tests.support.sse import parse_events

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about foxes."}]
PROMPT = "Once upon a time"
# What the simulated engine emits with seed=2 (its word cycle starts at the third word).
SEED2_WORDS = [" brown", " fox", " jumps", " over", " a", " lazy", " dog", ".", " the"]

# One event loop for the module, so that the A/B pair is started once and shared.
pytestmark = pytest.mark.asyncio(loop_scope="module")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def upstream_settings(url: str, **options: Any) -> Settings:
    """Gateway B: "up" is A's "sim", "up-slow" is A's "slow" (10 tokens/s)."""
    return Settings(
        models=[
            UpstreamModel(engine="openai", name="up", url=url, upstream_model="sim", **options),
            UpstreamModel(
                engine="openai", name="up-slow", url=url, upstream_model="slow", **options
            ),
        ],
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def a_and_b() -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """A serves the simulated engine; B serves A's models through the upstream engine.

    Shared by the module's tests: they look at what their own requests added to A's engine
    records (completed, aborted), never at the totals.
    """
    async with serve(simulated_settings()) as a, serve(upstream_settings(a.url)) as b:
        yield a, b


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def strict_a_and_b() -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """As ``a_and_b``, but A allows only n=1 while B allows the default n<=8."""
    async with serve(simulated_settings(max_n=1)) as a, serve(upstream_settings(a.url)) as b:
        yield a, b


@asynccontextmanager
async def openai_client(server: RunningServer) -> AsyncIterator[AsyncOpenAI]:
    # No retries: a retried 5xx would hide what the gateway answered the first time.
    async with AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


@dataclass
class Outcome:
    """What a client saw, the same shape for streamed and whole responses."""

    model: str
    texts: list[str]
    finish_reasons: list[str | None]
    usage: dict[str, int] | None
    logprobs: list[Any]
    chunks: list[Any]


async def chat(client: AsyncOpenAI, model: str, stream: bool, **kwargs: Any) -> Outcome:
    if not stream:
        r = await client.chat.completions.create(model=model, messages=MESSAGES, **kwargs)
        return Outcome(
            model=r.model,
            texts=[c.message.content or "" for c in r.choices],
            finish_reasons=[c.finish_reason for c in r.choices],
            usage=r.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
            if r.usage
            else None,
            logprobs=[c.logprobs.model_dump() if c.logprobs else None for c in r.choices],
            chunks=[],
        )
    n = kwargs.get("n", 1)
    outcome = Outcome("", [""] * n, [None] * n, None, [[] for _ in range(n)], [])
    response = await client.chat.completions.create(
        model=model, messages=MESSAGES, stream=True, **kwargs
    )
    async for chunk in response:
        outcome.chunks.append(chunk)
        outcome.model = chunk.model
        if chunk.usage is not None:
            outcome.usage = chunk.usage.model_dump(
                include={"prompt_tokens", "completion_tokens", "total_tokens"}
            )
        for choice in chunk.choices:
            outcome.texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                outcome.finish_reasons[choice.index] = choice.finish_reason
            if choice.logprobs is not None and choice.logprobs.content:
                outcome.logprobs[choice.index].extend(
                    item.model_dump() for item in choice.logprobs.content
                )
    return outcome


async def complete(client: AsyncOpenAI, model: str, stream: bool, **kwargs: Any) -> Outcome:
    if not stream:
        r = await client.completions.create(model=model, prompt=PROMPT, **kwargs)
        return Outcome(
            model=r.model,
            texts=[c.text for c in r.choices],
            finish_reasons=[c.finish_reason for c in r.choices],
            usage=r.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
            if r.usage
            else None,
            logprobs=[c.logprobs.model_dump() if c.logprobs else None for c in r.choices],
            chunks=[],
        )
    n = kwargs.get("n", 1)
    outcome = Outcome("", [""] * n, [None] * n, None, [[] for _ in range(n)], [])
    response = await client.completions.create(model=model, prompt=PROMPT, stream=True, **kwargs)
    async for chunk in response:
        outcome.chunks.append(chunk)
        outcome.model = chunk.model
        if chunk.usage is not None:
            outcome.usage = chunk.usage.model_dump(
                include={"prompt_tokens", "completion_tokens", "total_tokens"}
            )
        for choice in chunk.choices:
            outcome.texts[choice.index] += choice.text
            if choice.finish_reason is not None:
                outcome.finish_reasons[choice.index] = choice.finish_reason
            if choice.logprobs is not None and choice.logprobs.tokens:
                outcome.logprobs[choice.index].append(choice.logprobs.model_dump())
    return outcome


def sse_payloads(body: bytes) -> list[Any]:
    """The events of an SSE body, JSON-decoded; ``[DONE]`` stays the string."""
    return ["[DONE]" if e.done else e.json() for e in parse_events(body)]


def streamed_chat_text(payloads: list[Any]) -> str:
    return "".join(
        choice["delta"].get("content") or ""
        for p in payloads
        if isinstance(p, dict) and "choices" in p
        for choice in p["choices"]
    )


@asynccontextmanager
async def gateway_before(
    mode: Mode, **options: Any
) -> AsyncIterator[tuple[RunningServer, FakeUpstream]]:
    """Gateway B in front of a fake upstream doing ``mode``."""
    async with FakeUpstream(mode) as fake, serve(upstream_settings(fake.url, **options)) as b:
        yield b, fake


async def post_chat(b: RunningServer, stream: bool = True, **extra: Any) -> httpx.Response:
    body = {"model": "up", "messages": MESSAGES, "max_tokens": 8, "stream": stream, **extra}
    async with httpx.AsyncClient(base_url=b.url, timeout=10) as client:
        return await client.post("/v1/chat/completions", json=body)


# ---------------------------------------------------------------------------------------------
# Through a healthy upstream: same results as asking the upstream directly
# ---------------------------------------------------------------------------------------------

CASES: dict[str, tuple[dict[str, Any], list[str], list[str], int]] = {
    # name: (request options, expected texts, expected finish reasons, completion tokens)
    "length": ({"max_tokens": 5, "seed": 2}, ["".join(SEED2_WORDS[:5])], ["length"], 5),
    # The token that completed the stop sequence was generated, so it counts.
    "stop": (
        {"max_tokens": 8, "seed": 2, "stop": [" over"]},
        ["".join(SEED2_WORDS[:3])],
        ["stop"],
        4,
    ),
    "n2": (
        {"max_tokens": 4, "seed": 2, "n": 2},
        ["".join(SEED2_WORDS[:4]), "".join(SEED2_WORDS[1:5])],
        ["length", "length"],
        8,
    ),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("call", [chat, complete], ids=["chat", "completions"])
async def test_same_result_as_asking_the_upstream_directly(
    a_and_b: tuple[RunningServer, RunningServer], call: Any, case: str, stream: bool
) -> None:
    a, b = a_and_b
    engine = sim_engine(a)
    completed, aborted = len(engine.completed), len(engine.aborted)
    options, expected_texts, expected_reasons, completion_tokens = CASES[case]
    if stream:
        options = {**options, "stream_options": {"include_usage": True}}
    async with openai_client(a) as direct, openai_client(b) as gateway:
        want = await call(direct, "sim", stream, **options)
        got = await call(gateway, "up", stream, **options)

    assert got.texts == want.texts == expected_texts
    assert got.finish_reasons == want.finish_reasons == expected_reasons
    # Usage is the upstream's own count, not the gateway's byte estimate.
    assert got.usage is not None
    assert got.usage == want.usage
    assert got.usage["completion_tokens"] == completion_tokens
    assert got.usage["total_tokens"] == got.usage["prompt_tokens"] + completion_tokens
    # The gateway answers under its own model name, not the upstream's.
    assert got.model == "up"
    if stream:
        # include_usage: exactly one usage chunk, the last one, with no choices.
        usage_chunks = [c for c in got.chunks if c.usage is not None]
        assert usage_chunks == [got.chunks[-1]]
        assert got.chunks[-1].choices == []
    # The upstream did the work: A's engine ran both requests to completion.
    assert len(engine.completed) == completed + 2
    assert len(engine.aborted) == aborted


@pytest.mark.parametrize("call", [chat, complete], ids=["chat", "completions"])
async def test_stream_without_include_usage_has_no_usage_chunk(
    a_and_b: tuple[RunningServer, RunningServer], call: Any
) -> None:
    _, b = a_and_b
    async with openai_client(b) as gateway:
        got = await call(gateway, "up", True, max_tokens=3)
    assert got.texts == [" the quick brown"]
    assert got.finish_reasons == ["length"]
    assert got.usage is None
    assert all(c.choices for c in got.chunks)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_chat_top_logprobs_pass_through(
    a_and_b: tuple[RunningServer, RunningServer], stream: bool
) -> None:
    a, b = a_and_b
    options = {"max_tokens": 3, "seed": 2, "logprobs": True, "top_logprobs": 2}
    async with openai_client(a) as direct, openai_client(b) as gateway:
        want = await chat(direct, "sim", stream, **options)
        got = await chat(gateway, "up", stream, **options)

    assert got.logprobs == want.logprobs
    content = got.logprobs[0] if stream else got.logprobs[0]["content"]
    assert [item["token"] for item in content] == SEED2_WORDS[:3]
    for item in content:
        assert item["logprob"] == -0.5
        assert item["bytes"] == list(item["token"].encode())
        assert [(t["token"], t["logprob"]) for t in item["top_logprobs"]] == [
            (" the", -1.0),
            (" quick", -2.0),
        ]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_completion_logprobs_pass_through(
    a_and_b: tuple[RunningServer, RunningServer], stream: bool
) -> None:
    a, b = a_and_b
    options = {"max_tokens": 3, "seed": 2, "logprobs": 2}
    async with openai_client(a) as direct, openai_client(b) as gateway:
        want = await complete(direct, "sim", stream, **options)
        got = await complete(gateway, "up", stream, **options)

    assert got.logprobs == want.logprobs
    parts = got.logprobs[0] if stream else [got.logprobs[0]]
    assert [t for p in parts for t in p["tokens"]] == SEED2_WORDS[:3]
    assert [lp for p in parts for lp in p["token_logprobs"]] == [-0.5] * 3
    assert [top for p in parts for top in p["top_logprobs"]] == [{" the": -1.0, " quick": -2.0}] * 3
    if not stream:
        assert got.logprobs[0]["text_offset"] == [0, 6, 10]


async def test_streamed_completion_logprobs_text_offset_is_absolute(
    a_and_b: tuple[RunningServer, RunningServer],
) -> None:
    _, b = a_and_b
    async with openai_client(b) as gateway:
        got = await complete(gateway, "up", True, max_tokens=3, seed=2, logprobs=1)
    offsets = [o for part in got.logprobs[0] for o in part["text_offset"]]
    assert offsets == [0, 6, 10]


async def test_ready_when_the_upstream_answers(
    a_and_b: tuple[RunningServer, RunningServer],
) -> None:
    _, b = a_and_b
    async with httpx.AsyncClient(base_url=b.url) as client:
        response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json()["models"] == {"up": True, "up-slow": True}


async def test_request_without_max_tokens_works_as_upstream_directly(
    a_and_b: tuple[RunningServer, RunningServer],
) -> None:
    a, b = a_and_b
    async with openai_client(a) as direct, openai_client(b) as gateway:
        want = await chat(direct, "sim", False)
        got = await chat(gateway, "up", False)
    assert want.finish_reasons == ["length"]
    assert got.texts == want.texts


# ---------------------------------------------------------------------------------------------
# Aborts cross the upstream hop
# ---------------------------------------------------------------------------------------------


async def disconnect_mid_stream(b: RunningServer, engine: SimulatedEngine) -> float:
    """Stream from B until two words arrived, check A is generating, then hang up."""
    async with openai_client(b) as gateway:
        stream = await gateway.chat.completions.create(
            model="up-slow", messages=MESSAGES, max_tokens=100, stream=True
        )
        received = ""
        async for chunk in stream:
            received += "".join(c.delta.content or "" for c in chunk.choices)
            if len(received.split()) >= 2:
                break
        assert received == " the quick"
        assert len(engine.active) == 1  # A is generating for B right now
        await stream.close()  # the client goes away mid-stream
        return time.monotonic()


async def test_client_disconnect_stops_the_generation_on_the_upstream_engine(
    a_and_b: tuple[RunningServer, RunningServer],
) -> None:
    a, b = a_and_b
    engine = sim_engine(a, "slow")  # 10 tokens/s: the 100 tokens asked for would take 10 s
    completed = len(engine.completed)
    closed_at = await disconnect_mid_stream(b, engine)

    await eventually(lambda: not engine.active, 3.0, "A to stop generating")
    assert time.monotonic() - closed_at < 3.0
    assert len(engine.completed) == completed  # it ended early, not by running to max_tokens


async def test_client_disconnect_is_recorded_as_an_abort_on_the_upstream_engine(
    a_and_b: tuple[RunningServer, RunningServer],
) -> None:
    a, b = a_and_b
    engine = sim_engine(a, "slow")
    completed, aborted = len(engine.completed), len(engine.aborted)
    await disconnect_mid_stream(b, engine)

    # An abort is recorded before the request leaves .active, so waiting for that suffices.
    await eventually(lambda: not engine.active, 3.0, "A to stop generating")
    assert len(engine.aborted) == aborted + 1, f"no abort recorded: {engine.aborted}"
    assert len(engine.completed) == completed


# ---------------------------------------------------------------------------------------------
# Upstream errors become clear client errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("call", [chat, complete], ids=["chat", "completions"])
async def test_upstream_400_reaches_the_client_as_400(
    strict_a_and_b: tuple[RunningServer, RunningServer], call: Any, stream: bool
) -> None:
    a, b = strict_a_and_b
    async with openai_client(b) as gateway:
        with pytest.raises(openai.BadRequestError) as caught:
            await call(gateway, "up", stream, max_tokens=3, n=2)  # B allows n=2, A does not
    assert sim_engine(a).completed == []  # A rejected it before generating anything
    assert not sim_engine(a).active
    error = caught.value
    assert error.status_code == 400
    assert error.response.headers["content-type"] == "application/json"
    assert isinstance(error.body, dict)
    assert error.body["type"] == "invalid_request_error"
    assert "n must be at most 1" in error.body["message"]
    assert set(error.body) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_upstream_down_gives_503_before_any_stream_byte(stream: bool) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with (
        serve(upstream_settings(closed)) as b,
        httpx.AsyncClient(base_url=b.url, timeout=10) as client,
    ):
        body = {"model": "up", "messages": MESSAGES, "max_tokens": 3, "stream": stream}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            raw = await response.aread()
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/json"
        assert not raw.startswith(b"data:")
        error = orjson.loads(raw)["error"]
        assert error["type"] == "server_error"
        assert error["code"] == "no_healthy_replica"  # its health check failed
        assert "no healthy replica" in error["message"]

        ready = await client.get("/ready")
        assert ready.status_code == 503
        assert ready.json() == {
            "status": "not ready",
            "not_ready": ["up", "up-slow"],
            "models": {"up": False, "up-slow": False},
            "replicas": {"up": {"healthy": 0, "total": 1}, "up-slow": {"healthy": 0, "total": 1}},
        }


async def test_upstream_down_with_the_openai_client() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with serve(upstream_settings(closed)) as b, openai_client(b) as gateway:
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as caught:
                await chat(gateway, "up", stream, max_tokens=3)
            assert caught.value.status_code == 503


async def test_upstream_overloaded_503_keeps_retry_after() -> None:
    body = {"error": {"message": "queue full", "type": "server_error"}}
    overloaded = answer(body, 503, headers={"Retry-After": "7"})

    async with gateway_before(overloaded) as (b, _):
        response = await post_chat(b)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert "queue full" in response.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------
# Misbehaving upstreams
# ---------------------------------------------------------------------------------------------


async def test_request_sent_upstream_is_the_openai_request_for_the_upstream_model() -> None:
    well_behaved = sse_frames(chat_chunk(" hi"), chat_chunk(finish="stop"), b"data: [DONE]\n\n")

    async with gateway_before(well_behaved) as (b, fake):
        response = await post_chat(b, stream=False, seed=5, stop=["x"], temperature=0.5)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == " hi"
    [sent] = fake.bodies
    assert sent["model"] == "sim"
    assert sent["messages"] == MESSAGES
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert (sent["max_tokens"], sent["seed"], sent["stop"], sent["temperature"]) == (
        8,
        5,
        ["x"],
        0.5,
    )


@pytest.mark.parametrize("ending", ["eof", "reset"])
async def test_stream_cut_without_done_gives_in_band_error(ending: str) -> None:
    # Spaced out as a real server's tokens are. Lines still unread in aiohttp's buffer when the
    # connection breaks are lost: its reader raises the error first. Then a clean end of the
    # HTTP body without [DONE] ("eof"), or the connection dropping mid-body.
    words = (chat_chunk(" one"), chat_chunk(" two"), chat_chunk(" three"))
    truncated = sse_frames(*words, interval_s=0.05, ending="done" if ending == "eof" else "close")

    async with gateway_before(truncated) as (b, _):
        response = await post_chat(b)
    assert response.status_code == 200  # the stream had started: the error is in-band
    payloads = sse_payloads(response.content)
    assert streamed_chat_text(payloads) == " one two three"
    assert payloads[-1] == "[DONE]"
    error = payloads[-2]["error"]
    assert error["type"] == "server_error"
    assert error["code"] == "upstream_broken_stream"
    assert not any(
        choice.get("finish_reason")
        for p in payloads
        if isinstance(p, dict)
        for choice in p.get("choices", ())
    )


async def test_stream_cut_without_done_with_the_openai_client() -> None:
    truncated = sse_frames(chat_chunk(" one"), chat_chunk(" two"))  # the body ends, no [DONE]

    async with gateway_before(truncated) as (b, _), openai_client(b) as gateway:
        stream = await gateway.chat.completions.create(
            model="up", messages=MESSAGES, max_tokens=8, stream=True
        )
        received = ""
        with pytest.raises(openai.APIError, match="without \\[DONE\\]"):
            async for chunk in stream:
                received += "".join(c.delta.content or "" for c in chunk.choices)
    assert received == " one two"


@pytest.mark.parametrize("writes", ["apart", "together"])
async def test_garbage_after_tokens_gives_in_band_error(writes: str) -> None:
    """Also when the token and the garbage arrive in one read: the token still goes out
    before the error."""

    frames: tuple[bytes, ...] = (chat_chunk(" fine"), b"data: {this is not json\n\n")
    if writes == "together":
        frames = (b"".join(frames),)
    # Never ends on its own: the gateway must stop reading.
    async with gateway_before(sse_frames(*frames, ending="hang")) as (b, _):
        response = await post_chat(b)
    assert response.status_code == 200
    payloads = sse_payloads(response.content)
    assert streamed_chat_text(payloads) == " fine"
    assert payloads[-1] == "[DONE]"
    assert payloads[-2]["error"]["code"] == "upstream_malformed"
    assert "malformed" in payloads[-2]["error"]["message"]


async def test_garbage_before_the_first_token_is_a_502() -> None:
    async with gateway_before(sse_frames(b"data: [1, 2\n\n")) as (b, _):
        response = await post_chat(b)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_malformed"


async def test_upstream_in_band_error_is_relayed_in_band() -> None:
    error = {"error": {"message": "CUDA out of memory", "type": "server_error"}}
    fails = sse_frames(
        chat_chunk(" partial"), b"data: " + orjson.dumps(error) + b"\n\n", b"data: [DONE]\n\n"
    )

    async with gateway_before(fails) as (b, _):
        response = await post_chat(b)
    payloads = sse_payloads(response.content)
    assert streamed_chat_text(payloads) == " partial"
    assert payloads[-1] == "[DONE]"
    assert "CUDA out of memory" in payloads[-2]["error"]["message"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("hang", ["before-headers", "after-headers"])
async def test_upstream_silent_before_first_token_gives_504(hang: str, stream: bool) -> None:
    # After the headers: one comment, then silence.
    silent = HANG_BEFORE_HEADERS if hang == "before-headers" else HANG_AFTER_HEADERS

    async with gateway_before(silent, first_token_timeout_s=0.5) as (b, _):
        started = time.monotonic()
        response = await post_chat(b, stream=stream)
        elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "first_token_timeout"
    assert error["type"] == "server_error"
    assert 0.4 < elapsed < 2.0


async def test_keep_alives_do_not_extend_the_first_token_timeout() -> None:
    keep_alives = [b": keep-alive\n\n"] * 100  # 10 s of them, then silence
    stalled = sse_frames(*keep_alives, interval_s=0.1, ending="hang")

    async with gateway_before(stalled, first_token_timeout_s=0.5) as (b, _):
        async with asyncio.timeout(1.5):
            response = await post_chat(b)
    assert response.status_code == 504


async def test_upstream_stalled_between_tokens_gives_in_band_timeout() -> None:
    stalls = sse_frames(chat_chunk(" one"), chat_chunk(" two"), ending="hang")

    async with gateway_before(stalls, between_tokens_timeout_s=0.5) as (b, _):
        started = time.monotonic()
        response = await post_chat(b)
        elapsed = time.monotonic() - started
    assert response.status_code == 200
    payloads = sse_payloads(response.content)
    assert streamed_chat_text(payloads) == " one two"
    assert payloads[-1] == "[DONE]"
    error = payloads[-2]["error"]
    assert error["code"] == "between_tokens_timeout"
    assert error["type"] == "server_error"
    assert 0.4 < elapsed < 2.0


# ---------------------------------------------------------------------------------------------
# Connections to the upstream are reused
# ---------------------------------------------------------------------------------------------

HI, STOP_DONE = chat_chunk("hi"), chat_chunk(finish="stop") + b"data: [DONE]\n\n"


async def test_finished_streams_give_their_connection_back_to_the_pool() -> None:
    """A new TCP connection per request costs the gateway (and the upstream) more than the
    request itself: a completed stream's connection is reused by the next request."""
    # The body's end comes a little after [DONE].
    complete_stream = sse_frames(HI, STOP_DONE, interval_s=0.05)

    async with gateway_before(complete_stream) as (b, fake):
        for streamed in (True, False, True, True, False):
            reply = await post_chat(b, stream=streamed)
            assert reply.status_code == 200
            assert "hi" in reply.text
        assert fake.received == 5
    peers = {r.peer for r in fake.requests}
    assert len(peers) == 1, f"{len(peers)} connections for 5 sequential requests"


async def test_a_pooled_connection_the_upstream_closed_is_not_an_error() -> None:
    """An upstream closes idle keep-alive connections on its own schedule (vllm serve after
    5 s); one may close just as the gateway sends a request on it. Here every second request on
    a connection meets that close. The request is sent again on a new connection: the client
    sees a normal answer and the replica is not counted as failed."""
    # A kept-alive connection is closed under its next request.
    close_reused = dataclasses.replace(sse_frames(HI, STOP_DONE), close_reused=True)

    async with gateway_before(close_reused) as (b, fake):
        for streamed in (False, True, False):
            reply = await post_chat(b, stream=streamed)
            assert reply.status_code == 200, reply.text
            assert "hi" in reply.text
        async with httpx.AsyncClient(base_url=b.url) as client:
            metrics = (await client.get("/metrics")).text
    served = sum(not r.reused for r in fake.requests)
    assert served == 3
    failures = [
        line
        for line in metrics.splitlines()
        if line.startswith("llmserve_upstream_failures_total{") and f'replica="{fake.url}"' in line
    ]
    assert not failures, failures  # the process's registry holds other tests' series too
