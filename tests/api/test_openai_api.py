"""The OpenAI-compatible API over a real server: the official SDK, and raw HTTP where it hides
details. "sim" emits " the quick brown fox jumps over a lazy dog." (choice i starts i words in)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam
from tests.conftest import RunningServer, serve, sim_engine, simulated_settings
from tests.support import sse
from tests.support.errors import assert_openai_error
from tests.support.sse import Event

WORDS = (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ".")
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say something."}]


_sdk_clients: list[AsyncOpenAI] = []


def sdk(server: RunningServer) -> AsyncOpenAI:
    client = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    _sdk_clients.append(client)
    return client


@pytest.fixture(autouse=True)
async def _close_sdk_clients() -> AsyncIterator[None]:
    """Close each test's SDK clients inside its event loop (not later, in garbage collection)."""
    yield
    while _sdk_clients:
        await _sdk_clients.pop().close()


@pytest.fixture
async def http(sim_server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sim_server.url, timeout=10) as client:
        yield client


# --- chat and completions, whole responses -----------------------------------------------------


async def test_chat_completion(sim_server: RunningServer) -> None:
    result = await sdk(sim_server).chat.completions.create(model="sim", messages=CHAT, max_tokens=4)
    assert result.object == "chat.completion"
    assert result.id.startswith("chatcmpl-")
    assert result.model == "sim"
    assert len(result.choices) == 1
    choice = result.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == "".join(WORDS[:4])
    assert choice.finish_reason == "length"
    assert result.usage is not None
    assert result.usage.completion_tokens == 4
    assert result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + 4
    assert sim_engine(sim_server).completed == [result.id]


async def test_completion(sim_server: RunningServer) -> None:
    result = await sdk(sim_server).completions.create(model="sim", prompt="one two", max_tokens=3)
    assert result.object == "text_completion"
    assert result.id.startswith("cmpl-")
    assert result.choices[0].text == " the quick brown"
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (2, 3)


async def test_max_tokens_gives_length_and_exact_usage(sim_server: RunningServer) -> None:
    client = sdk(sim_server)
    for max_tokens in (1, 7):
        chat = await client.chat.completions.create(
            model="sim", messages=CHAT, max_tokens=max_tokens
        )
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage is not None
        assert chat.usage.completion_tokens == max_tokens
        comp = await client.completions.create(model="sim", prompt="x", max_tokens=max_tokens)
        assert comp.choices[0].finish_reason == "length"
        assert comp.usage is not None
        assert comp.usage.completion_tokens == max_tokens
    chat = await client.chat.completions.create(model="sim", messages=CHAT, max_completion_tokens=2)
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 2


async def test_default_max_tokens_is_clipped_to_the_context(sim_server: RunningServer) -> None:
    # "sim" has a 256-token context: a 250-token prompt leaves room for 6.
    result = await sdk(sim_server).completions.create(model="sim", prompt=" w" * 250)
    assert result.usage is not None
    assert result.usage.completion_tokens == 6
    assert result.choices[0].finish_reason == "length"


async def test_n_gives_two_choices(sim_server: RunningServer) -> None:
    client = sdk(sim_server)
    chat = await client.chat.completions.create(model="sim", messages=CHAT, n=2, max_tokens=3)
    assert [c.index for c in chat.choices] == [0, 1]
    assert [c.message.content for c in chat.choices] == [
        "".join(WORDS[0:3]),
        "".join(WORDS[1:4]),
    ]
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 6
    comp = await client.completions.create(model="sim", prompt="x", n=2, max_tokens=2)
    assert [c.index for c in comp.choices] == [0, 1]
    assert comp.choices[0].text != comp.choices[1].text


async def test_stop_gives_stop_and_omits_the_stop_string(sim_server: RunningServer) -> None:
    client = sdk(sim_server)
    chat = await client.chat.completions.create(
        model="sim", messages=CHAT, stop=[" fox"], max_tokens=20
    )
    assert chat.choices[0].finish_reason == "stop"
    assert chat.choices[0].message.content == " the quick brown"
    comp = await client.completions.create(model="sim", prompt="x", stop="ump", max_tokens=20)
    assert comp.choices[0].finish_reason == "stop"
    assert comp.choices[0].text == " the quick brown fox j"
    assert "ump" not in comp.choices[0].text


async def test_stop_not_reached_still_ends_by_length(sim_server: RunningServer) -> None:
    result = await sdk(sim_server).completions.create(
        model="sim", prompt="x", stop=["zebra"], max_tokens=3
    )
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].text == " the quick brown"


async def test_seed_is_deterministic(sim_server: RunningServer) -> None:
    client = sdk(sim_server)
    a = await client.completions.create(model="sim", prompt="x", seed=4, max_tokens=3)
    b = await client.completions.create(model="sim", prompt="x", seed=4, max_tokens=3)
    assert a.choices[0].text == b.choices[0].text == "".join(WORDS[4:7])


# --- streaming ---------------------------------------------------------------------------------


async def test_chat_stream(sim_server: RunningServer) -> None:
    stream = await sdk(sim_server).chat.completions.create(
        model="sim", messages=CHAT, max_tokens=4, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == "".join(WORDS[:4])
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.usage is None for c in chunks)


async def test_completion_stream(sim_server: RunningServer) -> None:
    stream = await sdk(sim_server).completions.create(
        model="sim", prompt="x", max_tokens=4, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks) == "".join(WORDS[:4])
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


async def test_stream_with_n_two_keeps_choices_apart(sim_server: RunningServer) -> None:
    stream = await sdk(sim_server).chat.completions.create(
        model="sim", messages=CHAT, max_tokens=3, n=2, stream=True
    )
    text: dict[int, str] = {0: "", 1: ""}
    roles: dict[int, int] = {0: 0, 1: 0}
    finish: dict[int, str | None] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            roles[choice.index] += choice.delta.role == "assistant"
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert text == {0: "".join(WORDS[0:3]), 1: "".join(WORDS[1:4])}
    assert roles == {0: 1, 1: 1}
    assert finish == {0: "length", 1: "length"}


async def test_stream_stop(sim_server: RunningServer) -> None:
    stream = await sdk(sim_server).completions.create(
        model="sim", prompt="x", max_tokens=20, stop=" fox", stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks) == " the quick brown"
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kind", ["chat", "completion"])
async def test_include_usage_gives_a_final_usage_chunk(
    sim_server: RunningServer, kind: str
) -> None:
    client = sdk(sim_server)
    if kind == "chat":
        stream: Any = await client.chat.completions.create(
            model="sim",
            messages=CHAT,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    else:
        stream = await client.completions.create(
            model="sim",
            prompt="one two three",
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5
    if kind == "completion":
        assert last.usage.prompt_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])


async def test_raw_stream_framing_ends_with_done(http: httpx.AsyncClient) -> None:
    body = {"model": "sim", "messages": CHAT, "max_tokens": 2, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        raw = await response.aread()
    events = sse.events(sse.parse(raw))
    assert events[-1] == Event("[DONE]")
    assert sum(e.done for e in events) == 1
    chunks = [e.json() for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == list(WORDS[:2])
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }


# --- logprobs ----------------------------------------------------------------------------------


async def test_chat_logprobs(sim_server: RunningServer) -> None:
    result = await sdk(sim_server).chat.completions.create(
        model="sim", messages=CHAT, max_tokens=3, logprobs=True, top_logprobs=2
    )
    logprobs = result.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert [t.token for t in logprobs.content] == list(WORDS[:3])
    for token in logprobs.content:
        assert token.logprob <= 0
        assert token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 2
        assert all(alt.logprob <= 0 for alt in token.top_logprobs)


async def test_chat_without_logprobs_has_none(sim_server: RunningServer) -> None:
    result = await sdk(sim_server).chat.completions.create(model="sim", messages=CHAT, max_tokens=2)
    assert result.choices[0].logprobs is None


async def test_completion_logprobs(sim_server: RunningServer) -> None:
    result = await sdk(sim_server).completions.create(
        model="sim", prompt="x", max_tokens=3, logprobs=2
    )
    logprobs = result.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == list(WORDS[:3])
    assert logprobs.token_logprobs is not None
    assert len(logprobs.token_logprobs) == 3
    assert logprobs.top_logprobs is not None
    assert [len(top) for top in logprobs.top_logprobs] == [2, 2, 2]
    assert logprobs.text_offset == [0, 4, 10]


async def test_stream_chat_logprobs(sim_server: RunningServer) -> None:
    stream = await sdk(sim_server).chat.completions.create(
        model="sim", messages=CHAT, max_tokens=2, logprobs=True, top_logprobs=1, stream=True
    )
    tokens = []
    async for chunk in stream:
        choice = chunk.choices[0]
        if choice.delta.content:
            assert choice.logprobs is not None
            assert choice.logprobs.content is not None
            assert len(choice.logprobs.content[0].top_logprobs) == 1
            tokens += [t.token for t in choice.logprobs.content]
    assert tokens == list(WORDS[:2])


async def test_stream_completion_text_offsets_match_the_whole_response(
    sim_server: RunningServer,
) -> None:
    stream = await sdk(sim_server).completions.create(
        model="sim", prompt="x", max_tokens=3, logprobs=1, stream=True
    )
    offsets: list[int] = []
    async for chunk in stream:
        logprobs = chunk.choices[0].logprobs
        if logprobs is not None and logprobs.text_offset:
            offsets += logprobs.text_offset
    assert offsets == [0, 4, 10]


# --- models and /generate ----------------------------------------------------------------------


async def test_models_lists_both(sim_server: RunningServer) -> None:
    page = await sdk(sim_server).models.list()
    assert [m.id for m in page.data] == ["sim", "slow"]
    assert all(m.object == "model" for m in page.data)
    async with httpx.AsyncClient() as client:
        raw = (await client.get(sim_server.url + "/v1/models")).json()
    assert raw["object"] == "list"
    assert {m["id"]: m["max_model_len"] for m in raw["data"]} == {"sim": 256, "slow": 4096}


async def test_a_model_is_retrieved_by_name_and_an_unknown_one_is_a_404(
    sim_server: RunningServer,
) -> None:
    model = await sdk(sim_server).models.retrieve("slow")
    assert (model.id, model.object) == ("slow", "model")
    with pytest.raises(openai.NotFoundError) as missing:
        await sdk(sim_server).models.retrieve("no-such/model")
    assert missing.value.code == "model_not_found"


async def test_generate_streams_one_event_per_token_then_end(http: httpx.AsyncClient) -> None:
    async with http.stream(
        "POST", "/generate", json={"prompt": "hello world", "max_tokens": 5}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = await response.aread()
    events = sse.events(sse.parse(raw))
    assert [e.event for e in events] == ["message"] * 5 + ["end"]
    assert [e.json() for e in events[:5]] == [{"token": w} for w in WORDS[:5]]
    assert events[-1].json() == {
        "finish_reason": "length",
        "usage": {"prompt_tokens": 2, "completion_tokens": 5},
    }
    assert b"[DONE]" not in raw


async def test_generate_with_stop_and_other_model(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/generate", json={"prompt": "x", "max_tokens": 9, "stop": " brown", "model": "sim"}
    )
    events = sse.events(sse.parse(response.content))
    assert "".join(e.json()["token"] for e in events if e.event == "message") == " the quick"
    end = events[-1].json()
    assert events[-1].event == "end"
    assert end["finish_reason"] == "stop"


async def test_generate_errors_are_json_with_status(http: httpx.AsyncClient) -> None:
    assert_openai_error(
        await http.post("/generate", json={"prompt": "x", "model": "nope"}),
        404,
        code="model_not_found",
    )
    assert_openai_error(await http.post("/generate", json={"max_tokens": 2}), 400, param="prompt")
    assert_openai_error(
        await http.post("/generate", json={"prompt": " w" * 300}),
        400,
        code="context_length_exceeded",
    )


# --- errors ------------------------------------------------------------------------------------


async def test_unknown_model_is_404(sim_server: RunningServer) -> None:
    client = sdk(sim_server)
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-nope", messages=CHAT)
    assert info.value.status_code == 404
    assert_openai_error(info.value.response, 404, param="model", code="model_not_found")
    assert "gpt-nope" in info.value.message
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="gpt-nope", prompt="x", stream=True)


async def test_malformed_json_is_400(http: httpx.AsyncClient) -> None:
    for body in (b'{"model": "sim", "messages": [', b"", b"\xff\xfe not json"):
        response = await http.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        error = assert_openai_error(response, 400, type="invalid_request_error")
        assert "JSON" in error["message"]


async def test_json_that_is_not_an_object_is_400(http: httpx.AsyncClient) -> None:
    assert_openai_error(await http.post("/v1/completions", json=[1, 2]), 400)
    assert_openai_error(await http.post("/v1/completions", json="hello"), 400)


WRONG_TYPES: list[tuple[str, dict[str, Any], str]] = [
    (
        "/v1/chat/completions",
        {"model": "sim", "messages": CHAT, "max_tokens": "lots"},
        "max_tokens",
    ),
    ("/v1/chat/completions", {"model": 5, "messages": CHAT}, "model"),
    ("/v1/chat/completions", {"model": "sim", "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"model": "sim", "messages": []}, "messages"),
    (
        "/v1/chat/completions",
        {"model": "sim", "messages": [{"role": "bot", "content": "x"}]},
        "messages.0.role",
    ),
    ("/v1/chat/completions", {"messages": CHAT}, "model"),
    ("/v1/completions", {"model": "sim", "prompt": "x", "n": "two"}, "n"),
    ("/v1/completions", {"model": "sim", "prompt": "x", "stream": "yes please"}, "stream"),
    ("/v1/completions", {"model": "sim", "prompt": 42}, "prompt"),
    ("/v1/completions", {"model": "sim", "prompt": "x", "max_tokens": 0}, "max_tokens"),
]


async def test_wrong_types_are_400_with_param(http: httpx.AsyncClient) -> None:
    # One server for all cases; each failure names its case.
    for path, body, param in WRONG_TYPES:
        response = await http.post(path, json=body)
        error = assert_openai_error(response, 400, type="invalid_request_error")
        assert error["param"] is not None, (body, error)
        # Union-typed fields may name the branch tried ("prompt.str"); the field comes first.
        assert error["param"].split(".")[0] == param.split(".")[0], (body, error)
        if "." in param:
            assert error["param"] == param, (body, error)
        assert error["code"] == "invalid_value"


async def test_temperature_out_of_range_is_400(sim_server: RunningServer) -> None:
    for temperature in (-0.1, 2.5):
        with pytest.raises(openai.BadRequestError) as info:
            await sdk(sim_server).chat.completions.create(
                model="sim", messages=CHAT, temperature=temperature
            )
        assert_openai_error(info.value.response, 400, param="temperature")
        assert "temperature" in info.value.message


async def test_n_over_limit_is_400(sim_server: RunningServer) -> None:
    limit = sim_server.settings.limits.max_n
    with pytest.raises(openai.BadRequestError) as info:
        await sdk(sim_server).completions.create(model="sim", prompt="x", n=limit + 1)
    error = assert_openai_error(info.value.response, 400, param="n")
    assert str(limit) in error["message"]


async def test_n_limit_is_configurable() -> None:
    async with serve(simulated_settings(max_n=2)) as server:
        client = sdk(server)
        ok = await client.completions.create(model="sim", prompt="x", n=2, max_tokens=1)
        assert len(ok.choices) == 2
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model="sim", prompt="x", n=3, max_tokens=1)
        assert_openai_error(info.value.response, 400, param="n")


@pytest.mark.parametrize("stream", [False, True])
async def test_prompt_over_context_is_400_context_length_exceeded(
    sim_server: RunningServer, stream: bool
) -> None:
    client = sdk(sim_server)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": " w" * 300}], stream=stream
        )
    assert_openai_error(info.value.response, 400, code="context_length_exceeded")
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model="sim", prompt="x", max_tokens=300, stream=stream)
    assert_openai_error(
        info.value.response, 400, code="context_length_exceeded", param="max_tokens"
    )
    assert sim_engine(sim_server).completed == []


async def test_completion_prompt_over_context_names_prompt(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/completions", json={"model": "sim", "prompt": " w" * 300})
    assert_openai_error(response, 400, code="context_length_exceeded", param="prompt")


async def test_unsupported_features_are_400(http: httpx.AsyncClient) -> None:
    for path, body, param in [
        ("/v1/completions", {"model": "sim", "prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"model": "sim", "prompt": "a", "echo": True}, "echo"),
        ("/v1/chat/completions", {"model": "sim", "messages": CHAT, "tools": [{}]}, "tools"),
        ("/v1/chat/completions", {"model": "sim", "messages": CHAT, "stop": ""}, "stop"),
    ]:
        assert_openai_error(await http.post(path, json=body), 400, param=param)


@pytest.fixture
async def small_body_server() -> AsyncIterator[RunningServer]:
    async with serve(simulated_settings(max_body_bytes=1024)) as running:
        yield running


async def test_body_over_limit_with_content_length_is_413(
    small_body_server: RunningServer,
) -> None:
    async with httpx.AsyncClient(base_url=small_body_server.url) as client:
        body = json.dumps({"model": "sim", "prompt": "x" * 2000}).encode()
        response = await client.post(
            "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        assert "content-length" in {k.lower() for k in response.request.headers}
        assert_openai_error(response, 413, code="request_too_large")
        # A body just under the limit is served.
        ok = await client.post(
            "/v1/completions", json={"model": "sim", "prompt": "x" * 900, "max_tokens": 1}
        )
        assert ok.status_code == 200
    assert sim_engine(small_body_server).completed != []


async def chunks_of(payload: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(payload), size):
        yield payload[start : start + size]


async def test_chunked_body_over_limit_is_413(small_body_server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=small_body_server.url) as client:
        payload = json.dumps({"model": "sim", "prompt": "x" * 3000}).encode()
        response = await client.post("/v1/completions", content=chunks_of(payload, 500))
        assert response.request.headers["transfer-encoding"] == "chunked"
        assert_openai_error(response, 413)
        # A chunked body under the limit is served.
        small = json.dumps({"model": "sim", "prompt": "hi", "max_tokens": 1}).encode()
        ok = await client.post("/v1/completions", content=chunks_of(small, 10))
        assert ok.status_code == 200
        assert ok.json()["choices"][0]["text"] == " the"


async def test_chunked_body_over_limit_has_the_same_code(
    small_body_server: RunningServer,
) -> None:
    async with httpx.AsyncClient(base_url=small_body_server.url) as client:
        payload = json.dumps({"model": "sim", "prompt": "x" * 3000}).encode()
        response = await client.post("/v1/completions", content=chunks_of(payload, 500))
    assert_openai_error(response, 413, code="request_too_large")


async def test_unknown_route_is_404(http: httpx.AsyncClient) -> None:
    assert_openai_error(await http.get("/v1/nothing-here"), 404)
    assert_openai_error(await http.post("/v2/chat/completions", json={}), 404)


async def test_wrong_method_is_405(http: httpx.AsyncClient) -> None:
    assert_openai_error(await http.get("/v1/chat/completions"), 405)
    assert_openai_error(await http.delete("/v1/completions"), 405)
    assert_openai_error(await http.post("/v1/models", json={}), 405)
    assert_openai_error(await http.get("/generate"), 405)


async def test_probes(http: httpx.AsyncClient) -> None:
    assert (await http.get("/health")).json() == {"status": "ok"}
    ready = await http.get("/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "models": {"sim": True, "slow": True}}
    # Load balancers and uptime checkers often probe with HEAD: same status, no body.
    for path in ("/health", "/ready"):
        head = await http.head(path)
        assert head.status_code == 200
        assert head.content == b""
