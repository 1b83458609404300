"""Hostile input over real sockets: oversized bodies and heads, deep JSON, broken UTF-8, huge
sampling parameters, a prompt one token over the context, wrong types everywhere, slow clients
(slowloris) and hundreds of idle connections.

Each case must end in a bounded, clear answer: the right status with the OpenAI error body
``{"error": {"message", "type", "param", "code"}}`` and no traceback, or a closed connection
where no answer is possible; and afterwards the server still serves and holds no slot
(``llmserve_requests_in_flight`` and ``llmserve_queue_requests`` back to 0 on /metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.config import Limits, Settings
from llmserve.engines.simulated import SimulatedEngine
from llmserve.validation.request import ChatMessage
from llmserve.wire.schema import ChatCompletionRequest, CompletionRequest, GenerateRequest
from tests.conftest import RunningServer, serve, simulated_models
from tests.reliability.helpers import (
    RawAnswer,
    assert_error_response,
    assert_no_traceback,
    assert_nothing_held,
    assert_openai_error,
    assert_still_serves,
    host_port,
    post_bytes,
    raw_exchange,
    request_head,
    simulated_config,
)
from tests.support.gateway import gateway_process

# "sim" is fast (a 256-token reply takes ~13 ms) with the 256-token context of
# conftest.simulated_models; "slow" is slow.
SIM_CONTEXT = 256


def fast_settings(**limits: Any) -> Settings:
    return Settings(models=simulated_models(20_000, 0.0), limits=Limits(**limits))


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    async with serve(fast_settings()) as running:
        yield running


@pytest.fixture
async def client(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        yield http


def engine(server: RunningServer, name: str = "sim") -> SimulatedEngine:
    found = server.engine(name)
    assert isinstance(found, SimulatedEngine)
    return found


async def post_raw(
    client: httpx.AsyncClient, path: str, body: bytes, **headers: str
) -> httpx.Response:
    return await client.post(
        path, content=body, headers={"content-type": "application/json", **headers}
    )


# --- oversized bodies --------------------------------------------------------------------------

SMALL_LIMIT = 64 * 1024


async def chunks(payload: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(payload), size):
        yield payload[start : start + size]


async def test_bodies_over_max_body_bytes_are_413_however_they_arrive() -> None:
    """Declared (Content-Length), chunked, and a Content-Length claimed without the body: each is
    a 413 ``request_too_large``; a body exactly at the limit is not refused for its size."""
    settings = fast_settings(max_body_bytes=SMALL_LIMIT)
    assert settings.limits.max_body_bytes == SMALL_LIMIT
    async with (
        serve(settings) as running,
        httpx.AsyncClient(base_url=running.url, timeout=30) as client,
    ):

        def body_of(size: int) -> bytes:
            head = b'{"model": "sim", "max_tokens": 1, "prompt": "'
            return head + b"x" * (size - len(head) - 2) + b'"}'

        for path in ("/v1/completions", "/v1/chat/completions", "/generate"):
            over = body_of(SMALL_LIMIT + 1)
            declared = await post_raw(client, path, over)
            assert_error_response(declared, 413, code="request_too_large")
            chunked = await client.post(path, content=chunks(over, 4096))
            assert chunked.request.headers["transfer-encoding"] == "chunked"
            assert_error_response(chunked, 413, code="request_too_large")
            # 16 MiB sent in one go: the answer is still the 413, not a reset.
            huge = await post_raw(client, path, body_of(16 * 1024 * 1024))
            assert_error_response(huge, 413, code="request_too_large")

        # Exactly at the limit: read and validated (a 1-token prompt of 64 KiB is one word).
        at_limit = await post_raw(client, "/v1/completions", body_of(SMALL_LIMIT))
        assert at_limit.status_code == 200, at_limit.text

        # A Content-Length of 1 TB with no body behind it: refused at once, before any read.
        claim = request_head(
            "POST",
            "/v1/completions",
            {"Content-Type": "application/json", "Content-Length": str(10**12)},
        )
        answer = await raw_exchange(running.url, claim, wait_s=5)
        assert answer.elapsed_s < 2, answer
        assert_openai_error(
            answer.status or 0, answer.headers, answer.body, 413, code="request_too_large"
        )

        await assert_still_serves(client)
        await assert_nothing_held(client)


# --- malformed HTTP framing --------------------------------------------------------------------

MALFORMED_FRAMING = {
    "content-length not a number": post_bytes("/v1/completions", b"{}", {"Content-Length": "x"}),
    "negative content-length": request_head("POST", "/v1/completions", {"Content-Length": "-1"}),
    "content-length past 2**64": request_head(
        "POST", "/v1/completions", {"Content-Length": "9" * 30}
    ),
    "two content-lengths": request_head("POST", "/v1/completions", {"Content-Length": "2"}).replace(
        b"Content-Length: 2\r\n", b"Content-Length: 2\r\nContent-Length: 7\r\n"
    )
    + b"{}",
    "content-length and chunked (smuggling)": request_head(
        "POST",
        "/v1/completions",
        {"Content-Length": "4", "Transfer-Encoding": "chunked"},
    )
    + b"0\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad chunk size": request_head("POST", "/v1/completions", {"Transfer-Encoding": "chunked"})
    + b"zz\r\n{}\r\n0\r\n\r\n",
    "header without a colon": b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "NUL in a header value": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "raw non-UTF-8 byte in the path": b"GET /v1/\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    "space in the path": b"GET /v1/mo dels HTTP/1.1\r\nHost: x\r\n\r\n",
    "not HTTP at all": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
}


async def test_requests_the_http_parser_rejects_get_an_openai_400_and_a_close(
    server: RunningServer,
) -> None:
    """Each malformed request gets a 400 and a close at once, no traceback, and the server
    serves on. The 400 carries the OpenAI error body every other error has (code
    ``invalid_http``), though the HTTP parser refuses these before the app sees them
    (http_protocol.py; its security headers are checked in test_security.py).

    By hand: ``printf 'GET /v1/\\xff HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' | nc 127.0.0.1 8000``
    """
    not_openai = []
    for case, data in MALFORMED_FRAMING.items():
        answer = await raw_exchange(server.url, data, wait_s=5)
        assert answer.closed, f"{case}: the connection was left open: {answer}"
        assert answer.elapsed_s < 2, answer
        assert answer.status in (400, None), f"{case}: {answer.data[:300]!r}"
        assert_no_traceback(answer.data, case)
        if answer.status is not None:
            try:
                assert_openai_error(400, answer.headers, answer.body, 400, where=case)
            except AssertionError:
                not_openai.append(f"{case}: {answer.headers.get('content-type')} {answer.body!r}")
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        await assert_still_serves(client)
        await assert_nothing_held(client)
    assert not not_openai, "400s without the OpenAI error body:\n" + "\n".join(not_openai)


# --- oversized request heads -------------------------------------------------------------------

OVERSIZED_HEADS = {
    "one 1 MiB header": request_head("GET", "/health", {"X-Big": "a" * (1 << 20)}),
    "10,000 headers": request_head("GET", "/health", {f"X-H{i}": "v" for i in range(10_000)}),
    "a 1 MiB cookie": request_head("GET", "/health", {"Cookie": "c=" + "b" * (1 << 20)}),
    "a 1 MiB query string": request_head("GET", "/health?" + "q" * (1 << 20)),
}


async def test_oversized_request_heads_are_refused(server: RunningServer) -> None:
    """A request head over ``limits.max_header_bytes`` (64 KiB by default; the test sends
    1 MiB in one header, a cookie or a query string, or 10,000 headers; nginx refuses over
    8-32 KiB, Node and h11 over 16 KiB) gets 431 (or 400) and a close, without a traceback;
    uvicorn's httptools protocol alone would read it whole and serve it. A large but ordinary
    head (an 8 KiB cookie) is served.

    By hand: ``curl -H "X-Big: $(head -c 1048576 /dev/zero | tr '\\0' a)" localhost:8000/health``
    → 431.
    """
    problems = []
    for name, head in OVERSIZED_HEADS.items():
        answer = await raw_exchange(server.url, head, wait_s=10)
        if answer.status == 200 or not answer.closed or answer.elapsed_s > 5:
            problems.append(f"{name}: status {answer.status}, closed {answer.closed}")
        elif answer.status is not None:
            if answer.status not in (400, 431):
                problems.append(f"{name}: status {answer.status}")
            assert_no_traceback(answer.data, name)
    ordinary = await raw_exchange(
        server.url, request_head("GET", "/health", {"Cookie": "c=" + "b" * 8192}), wait_s=5
    )
    assert ordinary.status == 200, ordinary
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        await assert_still_serves(client)
        await assert_nothing_held(client)
    assert not problems, "oversized heads were not refused:\n" + "\n".join(problems)


async def test_unfinished_oversized_heads_do_not_grow_server_memory(tmp_path: Path) -> None:
    """Heads that never finish are not buffered without bound: 16 connections sending 8 MiB
    of one unfinished header line each grow the server by under 64 MiB, whatever is sent, and
    the server keeps answering meanwhile. (Without the bound on heads, 20 x 20 MiB grew it from
    74 to 522 MiB when measured.)

    By hand: open 20 sockets to the server, send ``GET / HTTP/1.1\\r\\nX-Big: `` and 20 MiB of
    ``a`` on each without ending the line, and watch the server's RSS.
    """
    gateway = await gateway_process(tmp_path / "llmserve.yaml", simulated_config()).start("/health")
    writers: list[asyncio.StreamWriter] = []
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            for _ in range(10):
                await assert_still_serves(client)
            before = gateway.rss_mib()
            host, port = host_port(gateway.url)
            chunk = b"a" * (1 << 20)
            for _ in range(16):
                _, writer = await asyncio.open_connection(host, port)
                writers.append(writer)
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            for _ in range(8):
                for writer in writers:
                    writer.write(chunk)
                try:
                    results = await asyncio.wait_for(
                        asyncio.gather(*(w.drain() for w in writers), return_exceptions=True), 20
                    )
                except TimeoutError:
                    break  # the server stopped reading them: bounded, as promised
                assert all(r is None or isinstance(r, OSError) for r in results), results
            await asyncio.sleep(1.0)
            grown = gateway.rss_mib() - before
            await assert_still_serves(client)
            for writer in writers:
                writer.close()
            writers.clear()
            await asyncio.sleep(0.5)
            await assert_still_serves(client)
            await assert_nothing_held(client)
        assert grown < 64, f"16 unfinished 8 MiB heads grew the server by {grown:.0f} MiB"
    finally:
        for writer in writers:
            writer.close()
        await gateway.stop()


# --- deeply nested JSON ------------------------------------------------------------------------


def nested_arrays(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nested_objects(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


async def test_deeply_nested_json_is_a_quick_400(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    """Nesting past the parser's depth limit anywhere is a 400 "not valid JSON"; moderate
    nesting in a field this engine does not serve is a 400 naming that field, as in a typed
    field. None reaches the engine, none takes long."""
    base = b'{"model": "sim", "max_tokens": 1, "prompt": "hi", "extra": '
    cases: list[tuple[str, bytes, int, str | None]] = [
        ("/v1/completions", base + nested_arrays(100_000) + b"}", 400, None),
        ("/v1/completions", base + nested_objects(100_000) + b"}", 400, None),
        ("/v1/completions", nested_arrays(500_000), 400, None),
        ("/v1/completions", base + nested_arrays(500) + b"}", 400, "extra"),
        (
            "/v1/completions",
            b'{"model": "sim", "prompt": ' + nested_arrays(500) + b"}",
            400,
            "prompt",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "sim", "messages": [{"role": "user", "content": '
            + nested_arrays(500)
            + b"}]}",
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "sim", "messages": ' + nested_objects(100_000) + b"}",
            400,
            None,
        ),
        ("/generate", b'{"prompt": "hi", "stop": ' + nested_arrays(100_000) + b"}", 400, None),
    ]
    started_before = len(engine(server).started)
    for path, body, status, param in cases:
        began = time.monotonic()
        response = await post_raw(client, path, body)
        where = f"{path} {body[:70]!r}"
        assert time.monotonic() - began < 2, where
        error = assert_error_response(response, status, param=param, where=where)
        if param is None:
            assert "JSON" in error["message"], where
    assert len(engine(server).started) == started_before  # none reached the engine
    await assert_still_serves(client)
    await assert_nothing_held(client)


# --- invalid UTF-8 -----------------------------------------------------------------------------

INVALID_TEXT_BODIES = {
    "raw 0xff 0xfe in a string": b'{"model": "sim", "prompt": "\xff\xfe", "max_tokens": 1}',
    "overlong encoding of /": b'{"model": "sim", "prompt": "\xc0\xaf", "max_tokens": 1}',
    "truncated multibyte": b'{"model": "sim", "prompt": "\xe2\x82", "max_tokens": 1}',
    "encoded surrogate": b'{"model": "sim", "prompt": "\xed\xa0\x80", "max_tokens": 1}',
    "lone surrogate escape in prompt": b'{"model": "sim", "prompt": "a\\ud800b", "max_tokens": 1}',
    "lone low surrogate escape": b'{"model": "sim", "prompt": "\\udfff", "max_tokens": 1}',
    "lone surrogate in stop": b'{"model": "sim", "prompt": "x", "stop": ["\\ud800"]}',
    "lone surrogate in model": b'{"model": "\\ud800", "prompt": "x"}',
    "lone surrogate in user": b'{"model": "sim", "prompt": "x", "user": "\\ud800"}',
    "UTF-16 body": '{"model": "sim", "prompt": "x"}'.encode("utf-16"),
    "Latin-1 body": '{"model": "sim", "prompt": "café"}'.encode("latin-1"),
    "invalid byte in a key": b'{"mo\xffdel": "sim", "prompt": "x"}',
}


async def test_invalid_utf8_and_lone_surrogates_in_bodies_are_400(
    server: RunningServer, client: httpx.AsyncClient
) -> None:
    started_before = len(engine(server).started)
    for route in ("/v1/completions", "/generate"):
        for name, body in INVALID_TEXT_BODIES.items():
            response = await post_raw(client, route, body)
            assert_error_response(response, 400, where=f"{route} {name}")
    chat_bodies = [
        b'{"model": "sim", "messages": [{"role": "user", "content": "\xff"}]}',
        b'{"model": "sim", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "sim", "messages": [{"role": "user", "content": [{"type": "text",'
        b' "text": "\\udc00"}]}]}',
        b'{"model": "sim", "messages": [{"role": "user", "content": "x", "name": "\\ud800"}]}',
    ]
    for body in chat_bodies:
        assert_error_response(
            await post_raw(client, "/v1/chat/completions", body), 400, where=repr(body)
        )
    assert len(engine(server).started) == started_before
    await assert_still_serves(client)
    await assert_nothing_held(client)


async def test_invalid_utf8_in_headers_and_paths_is_harmless(server: RunningServer) -> None:
    """Non-UTF-8 bytes in header values are taken as opaque (Latin-1) and never echoed; a
    percent-encoded invalid byte in a path is a plain 404."""
    completion = b'{"model": "sim", "prompt": "x", "max_tokens": 1}'
    for header in (b"X-Request-ID", b"Authorization", b"traceparent", b"tracestate", b"Origin"):
        head = post_bytes("/v1/completions", completion).replace(
            b"\r\n\r\n", b"\r\n" + header + b": \xff\xfe\xc0\xaf\r\n\r\n", 1
        )
        answer = await raw_exchange(server.url, head)
        assert answer.status == 200, (header, answer.data[:300])
        assert b"\xff\xfe" not in answer.data, header
    queue = post_bytes("/v1/completions", completion, {"X-Queue-Timeout": "\xff"})
    answer = await raw_exchange(server.url, queue)
    assert_openai_error(
        answer.status or 0, answer.headers, answer.body, 400, param="x-queue-timeout"
    )
    for path in ("/v1/%ff", "/v1/%c0%af", "/%ed%a0%80", "/v1/completions%ff"):
        answer = await raw_exchange(server.url, request_head("GET", path))
        assert_openai_error(answer.status or 0, answer.headers, answer.body, 404, where=path)
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        await assert_still_serves(client)
        await assert_nothing_held(client)


# --- huge sampling parameters ------------------------------------------------------------------

CHAT_BASE: dict[str, Any] = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION_BASE: dict[str, Any] = {"model": "sim", "prompt": "hi"}
GENERATE_BASE: dict[str, Any] = {"prompt": "hi"}

# (route, base body, fields to set, the param the 400 must name)
HUGE: list[tuple[str, dict[str, Any], dict[str, Any], tuple[str, ...]]] = [
    ("/v1/completions", COMPLETION_BASE, {"n": 10**9}, ("n",)),
    ("/v1/completions", COMPLETION_BASE, {"n": 2**70}, ("n",)),
    ("/v1/completions", COMPLETION_BASE, {"n": 0}, ("n",)),
    ("/v1/chat/completions", CHAT_BASE, {"n": 10**9}, ("n",)),
    ("/v1/completions", COMPLETION_BASE, {"max_tokens": 10**12}, ("max_tokens",)),
    ("/v1/completions", COMPLETION_BASE, {"max_tokens": 2**70}, ("max_tokens",)),
    ("/v1/completions", COMPLETION_BASE, {"max_tokens": -1}, ("max_tokens",)),
    ("/v1/chat/completions", CHAT_BASE, {"max_tokens": 10**12}, ("max_tokens",)),
    (
        "/v1/chat/completions",
        CHAT_BASE,
        {"max_completion_tokens": 10**12},
        ("max_completion_tokens", "max_tokens"),
    ),
    ("/generate", GENERATE_BASE, {"max_tokens": 10**12}, ("max_tokens",)),
    ("/v1/completions", COMPLETION_BASE, {"logprobs": 10**9}, ("logprobs",)),
    ("/v1/completions", COMPLETION_BASE, {"logprobs": -1}, ("logprobs",)),
    (
        "/v1/chat/completions",
        CHAT_BASE,
        {"logprobs": True, "top_logprobs": 10**9},
        ("top_logprobs",),
    ),
    ("/v1/chat/completions", CHAT_BASE, {"top_logprobs": 5}, ("top_logprobs",)),
    ("/v1/completions", COMPLETION_BASE, {"stop": ["x"] * 100_000}, ("stop",)),
    ("/v1/completions", COMPLETION_BASE, {"stop": [f"s{i}" for i in range(9)]}, ("stop",)),
    ("/v1/completions", COMPLETION_BASE, {"stop": "x" * 100_000}, ("stop",)),
    ("/v1/completions", COMPLETION_BASE, {"stop": ["ok", "y" * 257]}, ("stop",)),
    ("/v1/chat/completions", CHAT_BASE, {"stop": ["x"] * 100_000}, ("stop",)),
    ("/generate", GENERATE_BASE, {"stop": ["x"] * 100_000}, ("stop",)),
    ("/v1/completions", COMPLETION_BASE, {"top_k": 10**30}, ("top_k",)),
    ("/v1/completions", COMPLETION_BASE, {"seed": 10**30}, ("seed",)),
    ("/v1/completions", COMPLETION_BASE, {"priority": 10**30}, ("priority",)),
    ("/v1/completions", COMPLETION_BASE, {"temperature": 1e308}, ("temperature",)),
    ("/v1/completions", COMPLETION_BASE, {"presence_penalty": -1e308}, ("presence_penalty",)),
    ("/v1/completions", COMPLETION_BASE, {"best_of": 10**9}, ("best_of",)),
    ("/v1/completions", COMPLETION_BASE, {"prompt": ["a"] * 100_000}, ("prompt",)),
    (
        "/v1/chat/completions",
        CHAT_BASE,
        {"messages": [{"role": "user", "content": "x"}] * 5000},
        ("messages",),
    ),
    ("/v1/completions", COMPLETION_BASE, {"model": "m" * 100_000}, ("model",)),
    ("/v1/completions", COMPLETION_BASE, {"user": "u" * 100_000}, ("user",)),
]


@pytest.mark.parametrize("stream", [False, True])
async def test_huge_sampling_parameters_are_400_naming_the_parameter(
    server: RunningServer, client: httpx.AsyncClient, stream: bool
) -> None:
    """Every bound is checked before any engine work: a 400 (JSON, even when a stream was asked
    for) whose ``param`` names the field, whatever the size of the value."""
    for route, base, fields, param in HUGE:
        body = {**base, **fields}
        if route != "/generate":
            body["stream"] = stream
        began = time.monotonic()
        response = await client.post(route, json=body)
        where = f"{route} {str(fields)[:80]} stream={stream}"
        assert time.monotonic() - began < 2, where
        assert_error_response(response, 400, param=param, where=where)
    assert engine(server).started == set()
    await assert_still_serves(client)
    await assert_nothing_held(client)


# --- the context length ------------------------------------------------------------------------


def words(count: int) -> str:
    return " w" * count


def chat_content_for(server: RunningServer, prompt_tokens: int) -> str:
    """Chat content whose rendered prompt is exactly ``prompt_tokens`` tokens long."""
    codec = engine(server).codec
    overhead = len(codec.encode(codec.render_chat((ChatMessage("user", ""),)), False))
    content = words(prompt_tokens - overhead)
    rendered = codec.render_chat((ChatMessage("user", content),))
    assert len(codec.encode(rendered, False)) == prompt_tokens
    return content


@pytest.mark.parametrize("stream", [False, True])
async def test_a_prompt_one_token_over_the_context_is_context_length_exceeded(
    server: RunningServer, client: httpx.AsyncClient, stream: bool
) -> None:
    """At the boundary exactly: a prompt of context-1 tokens is served (1 token of room), one of
    ``context`` tokens is a 400 ``context_length_exceeded`` naming the prompt; a max_tokens that
    fits exactly is served, one more is a 400 naming max_tokens. Streams too (JSON 400, no
    stream opened)."""
    full = SIM_CONTEXT
    last = chat_content_for(server, full - 1)
    over = chat_content_for(server, full)
    served: list[tuple[str, dict[str, Any]]] = [
        ("/v1/completions", {"model": "sim", "prompt": words(full - 1)}),
        ("/v1/completions", {"model": "sim", "prompt": words(full - 10), "max_tokens": 10}),
        ("/v1/chat/completions", {"model": "sim", "messages": [{"role": "user", "content": last}]}),
        ("/generate", {"prompt": words(full - 1)}),
    ]
    refused: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/completions", {"model": "sim", "prompt": words(full)}, "prompt"),
        ("/v1/completions", {"model": "sim", "prompt": words(full * 50)}, "prompt"),
        (
            "/v1/completions",
            {"model": "sim", "prompt": words(full - 10), "max_tokens": 11},
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {"model": "sim", "messages": [{"role": "user", "content": over}]},
            "messages",
        ),
        (
            "/v1/chat/completions",
            {"model": "sim", "messages": [{"role": "user", "content": last}], "max_tokens": 2},
            "max_tokens",
        ),
        ("/generate", {"prompt": words(full)}, "prompt"),
    ]
    for route, body in served:
        if route != "/generate":
            body = {**body, "stream": stream}
        response = await client.post(route, json=body)
        assert response.status_code == 200, (route, response.text)
    started = len(engine(server).started)
    for route, body, param in refused:
        if route != "/generate":
            body = {**body, "stream": stream}
        response = await client.post(route, json=body)
        error = assert_error_response(
            response, 400, code="context_length_exceeded", param=param, where=route
        )
        assert str(full) in error["message"]
    assert len(engine(server).started) == started  # none of the refused reached the engine
    await assert_nothing_held(client)


# --- wrong types -------------------------------------------------------------------------------

WRONG_VALUES: list[Any] = [
    [],
    {},
    "x",
    -1,
    1.5,
    None,
    True,
    [[1]],
    {"a": [None]},
    "9" * 400,
    2**70,
]
TYPED_ROUTES: list[tuple[str, type[Any], dict[str, Any]]] = [
    ("/v1/chat/completions", ChatCompletionRequest, {**CHAT_BASE, "max_tokens": 1}),
    ("/v1/completions", CompletionRequest, {**COMPLETION_BASE, "max_tokens": 1}),
    ("/generate", GenerateRequest, {**GENERATE_BASE, "max_tokens": 1}),
]


async def test_a_wrong_type_in_any_field_is_a_400_naming_it_never_a_500(
    client: httpx.AsyncClient,
) -> None:
    """Every field of every request schema, set to each of a list of wrong-typed (or merely
    odd) values: the answer is a 200 (the value was acceptable), a 404 for an unknown model, or
    a 400 whose ``param`` names that field. Never a 5xx, never a traceback."""
    checked = 0
    for route, model, base in TYPED_ROUTES:
        for field in model.model_fields:
            for value in WRONG_VALUES:
                body = {**base, field: value}
                response = await client.post(route, json=body)
                where = f"{route} {field}={str(value)[:40]}"
                assert response.status_code in (200, 400, 404), (where, response.text[:500])
                checked += 1
                if response.status_code == 200:
                    continue
                if response.status_code == 404:
                    assert_error_response(
                        response, 404, code="model_not_found", param="model", where=where
                    )
                    continue
                # max_completion_tokens is checked as max_tokens, and the 400 may name either.
                names = (field, "max_tokens") if field == "max_completion_tokens" else (field,)
                assert_error_response(response, 400, param=names, where=where)
    for not_an_object in (b"[]", b"null", b"1", b'"s"', b"true", b"", b"{", b"{}{}"):
        for route, _, _ in TYPED_ROUTES:
            response = await post_raw(client, route, not_an_object)
            assert_error_response(response, 400, where=f"{route} {not_an_object!r}")
    assert checked > 300
    await assert_still_serves(client)
    await assert_nothing_held(client)


# --- slow clients (slowloris) ------------------------------------------------------------------

# The promise: a connection that has not delivered a complete request head this many seconds
# after it opened (or after its previous response) is answered 408 or closed ...
HEAD_DEADLINE_S = 10.0
# ... and a request whose body has not fully arrived this long after its head is answered 408
# (with the OpenAI error body) or closed. Neither holds a queue or engine slot meanwhile.
BODY_DEADLINE_S = 30.0
# Scheduling slack on a loaded 2-core machine.
SLACK_S = 5.0
TRICKLE_EVERY_S = 0.5


async def slow_client(url: str, opening: bytes, drip: bytes | None, bound_s: float) -> RawAnswer:
    """Send ``opening``, then ``drip`` every TRICKLE_EVERY_S (if any), until the server answers
    or closes, or ``bound_s`` passes. The answer records which came first."""
    host, port = host_port(url)
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    received = b""
    closed = False

    async def read() -> None:
        nonlocal received, closed
        try:
            while chunk := await reader.read(65536):
                received += chunk
        except (ConnectionError, OSError):
            pass
        closed = True

    async def write() -> None:
        try:
            if opening:
                writer.write(opening)
                await writer.drain()
            while drip is not None:
                await asyncio.sleep(TRICKLE_EVERY_S)
                writer.write(drip)
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    reading = asyncio.ensure_future(read())
    writing = asyncio.ensure_future(write())
    try:
        await asyncio.wait({reading}, timeout=bound_s)
    finally:
        writing.cancel()
        reading.cancel()
        await asyncio.gather(reading, writing, return_exceptions=True)
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return RawAnswer(received, closed, time.monotonic() - started)


async def test_slow_clients_are_answered_or_cut_off_within_the_stated_time(
    server: RunningServer,
) -> None:
    """Slow clients (slowloris) are cut off in bounded time: a head must arrive within
    HEAD_DEADLINE_S (``limits.header_timeout_s``, 10 s) of the connection opening (or of the
    previous response), a body within BODY_DEADLINE_S (``limits.body_timeout_s``, 30 s) of its
    head; otherwise 408 (OpenAI body) or a close. (uvicorn's only timer is the keep-alive one,
    cancelled by the first byte: without these bounds each of the four clients below would be
    held open forever, and enough of them would exhaust the server's file descriptors.) Meanwhile
    the server answers others at once and holds no slot for them.

    By hand: ``(printf 'POST /v1/completions HTTP/1.1\\r\\nHost: x\\r\\nX-Pad: ';
    while sleep 1; do printf a; done) | nc 127.0.0.1 8000`` is answered 408 within ~10 s;
    likewise ``nc 127.0.0.1 8000`` sending nothing is closed, and a Content-Length: 4000 body
    sent a byte a second gets 408 within ~30 s.
    """
    body_head = request_head(
        "POST",
        "/v1/completions",
        {"Content-Type": "application/json", "Content-Length": "4000"},
    )
    chunked_head = request_head(
        "POST",
        "/v1/completions",
        {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    head_bound = HEAD_DEADLINE_S + SLACK_S
    body_bound = BODY_DEADLINE_S + SLACK_S
    clients = {
        "idle (sends nothing)": slow_client(server.url, b"", None, head_bound),
        "head trickled": slow_client(
            server.url,
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Pad: ",
            b"a",
            head_bound,
        ),
        "body trickled (Content-Length)": slow_client(
            server.url, body_head + b'{"model": "sim", "prompt": "', b"a", body_bound
        ),
        "body trickled (chunked)": slow_client(server.url, chunked_head, b"1\r\na\r\n", body_bound),
    }
    tasks = {name: asyncio.ensure_future(c) for name, c in clients.items()}
    try:
        await asyncio.sleep(2)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            # Others are served at once, and the slow ones hold nothing.
            await assert_still_serves(client, within_s=1.0)
            await assert_nothing_held(client, within=0.5)
            answers = {name: await task for name, task in tasks.items()}
            await assert_still_serves(client, within_s=1.0)
            await assert_nothing_held(client)
    finally:
        for task in tasks.values():
            task.cancel()
    problems = []
    for name, answer in answers.items():
        bound = head_bound if "body" not in name else body_bound
        if not answer.closed and answer.status is None:
            problems.append(f"{name}: still open after {answer.elapsed_s:.1f} s (bound {bound})")
            continue
        if answer.status is not None:
            if answer.status not in (400, 408, 413, 431):
                problems.append(f"{name}: status {answer.status}")
            elif answer.headers.get("content-type", "").startswith("application/json"):
                assert_openai_error(answer.status, answer.headers, answer.body, answer.status)
    assert not problems, "slow clients were not cut off:\n" + "\n".join(problems)


# --- many idle connections ---------------------------------------------------------------------

IDLE = 500
HALF_OPEN = 100
KEPT_ALIVE = 100


async def test_many_idle_connections_neither_starve_nor_bloat_the_server(tmp_path: Path) -> None:
    """500 sockets that send nothing, 100 that sent half a request head, and 100 kept alive
    after a request: a real request is still answered in under a second, and the server's
    resident memory grows by under 32 MiB. When they all go, it still serves and holds nothing.
    (llmserve as a process, so its RSS is its own.)"""
    gateway = await gateway_process(tmp_path / "llmserve.yaml", simulated_config()).start("/health")
    host, port = host_port(gateway.url)
    writers: list[asyncio.StreamWriter] = []
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            for _ in range(20):
                await assert_still_serves(client)
            before = gateway.rss_mib()
            for _ in range(IDLE):
                writers.append((await asyncio.open_connection(host, port))[1])
            for _ in range(HALF_OPEN):
                _, writer = await asyncio.open_connection(host, port)
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: app")
                writers.append(writer)
            keep_alive = post_bytes(
                "/v1/completions",
                b'{"model": "sim", "prompt": "x", "max_tokens": 1}',
                {"Connection": "keep-alive"},
            )
            for _ in range(KEPT_ALIVE):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(keep_alive)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200"), head
                writers.append(writer)
            await asyncio.sleep(1)
            slowest = max([await assert_still_serves(client, within_s=1.0) for _ in range(5)])
            health_started = time.monotonic()
            assert (await client.get("/health")).status_code == 200
            health_s = time.monotonic() - health_started
            grown = gateway.rss_mib() - before
            for writer in writers:
                writer.close()
            writers.clear()
            await asyncio.sleep(0.5)
            await assert_still_serves(client)
            await assert_nothing_held(client)
        assert health_s < 0.5, f"/health took {health_s:.2f} s with {IDLE} idle connections"
        assert slowest < 1.0
        assert grown < 32, f"{IDLE + HALF_OPEN + KEPT_ALIVE} idle connections: +{grown:.1f} MiB"
    finally:
        for writer in writers:
            writer.close()
        await gateway.stop()
    assert "Traceback" not in gateway.log_text(), gateway.log_text(3000)
