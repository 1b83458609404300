"""What a client sees when generation fails, with the whole app driven in process
(``httpx.ASGITransport``) over a scripted engine: an error before the first byte is a whole
OpenAI error body with the error's own status and headers, streaming or not; once the stream
has started (a token, or only a keep-alive comment) it is an in-band error event, then
``[DONE]``, and nothing else. tests/streaming proves the timing over real sockets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from tests.support.errors import assert_openai_error
from tests.support.scripted_engine import Delay, Handler, ScriptedEngine, Step
from tests.support.sse import Comment, Event, parse, parse_events

from llmserve.app import create_app
from llmserve.config import AuthConfig, Limits, Settings, SimulatedModel
from llmserve.engines.events import TextDelta
from llmserve.errors import (
    EngineFailure,
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    LLMServeError,
)
from llmserve.registry import ModelRegistry
from llmserve.validation.request import ValidatedRequest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def gateway(engine: ScriptedEngine, **settings: Any) -> FastAPI:
    model = SimulatedModel(engine="simulated", name="m")
    return create_app(
        Settings(models=[model], auth=AuthConfig(enabled=False), **settings),
        ModelRegistry({"m": engine}, {"m": model}),
    )


async def post(app: FastAPI, path: str, stream: bool) -> httpx.Response:
    body: dict[str, Any] = {"model": "m", "max_tokens": 8, "stream": stream}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        return await client.post(path, json=body)


def raising(error: BaseException) -> Handler:
    def handler(_: ValidatedRequest) -> list[Step]:
        raise error

    return handler


def after_hello(error: BaseException) -> Handler:
    def handler(_: ValidatedRequest) -> Iterator[Step]:
        yield TextDelta(0, "Hel", 1)
        yield TextDelta(0, "lo", 1)
        raise error

    return handler


def error_body(error: LLMServeError) -> dict[str, Any]:
    return {
        "error": {
            "message": error.message,
            "type": error.error_type,
            "param": error.param,
            "code": error.code,
        }
    }


BEFORE_FIRST_BYTE = [
    EngineUnavailable(
        "no healthy replica of model 'm' (2 of 2 out)",
        code="no_healthy_replica",
        retry_after_s=2,
    ),
    EngineFailure("the upstream answered 500", code="upstream_http_error"),
    EngineTimeout("the upstream engine sent no token in time", code="first_token_timeout"),
    InvalidRequest("the prompt is too long", param="messages", code="context_length_exceeded"),
]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("error", BEFORE_FIRST_BYTE, ids=lambda e: e.code)
async def test_error_before_the_first_byte_is_a_whole_error_body_with_its_status(
    error: LLMServeError, stream: bool
) -> None:
    response = await post(gateway(ScriptedEngine(raising(error))), CHAT, stream)
    assert assert_openai_error(response, error.status) == error_body(error)["error"]
    if error.retry_after_s is not None:
        assert response.headers["retry-after"] == str(error.retry_after_s)


async def test_deadline_before_the_first_byte_is_a_504_and_aborts_the_engine() -> None:
    engine = ScriptedEngine(lambda _: [Delay(5), TextDelta(0, "late", 1)])
    app = gateway(engine, limits=Limits(request_timeout_s=0.05))
    response = await post(app, CHAT, stream=True)
    assert_openai_error(response, 504, code="request_timeout")
    assert engine.aborts == engine.call_ids and len(engine.aborts) == 1


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
async def test_error_after_the_first_byte_is_in_band_then_done(path: str) -> None:
    failure = EngineFailure("the upstream stream broke", code="upstream_broken_stream")
    response = await post(gateway(ScriptedEngine(after_hello(failure))), path, stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    *chunks, error, done = parse_events(response.content)
    assert done.done
    assert error.json() == error_body(failure)
    choices = [chunk.json()["choices"][0] for chunk in chunks]
    text = [c["delta"].get("content") if path == CHAT else c["text"] for c in choices]
    assert "".join(t for t in text if t) == "Hello"  # what was generated got out first
    assert all(c["finish_reason"] is None for c in choices)  # it did not end as if complete


async def test_error_after_only_a_keepalive_is_in_band_too() -> None:
    # The stream opened (200, keep-alive comments) while the first event was slow to come.
    def late_failure(_: ValidatedRequest) -> Iterator[Step]:
        yield Delay(0.1)
        raise EngineTimeout("the upstream engine sent no token in time", code="first_token_timeout")

    app = gateway(ScriptedEngine(late_failure), keepalive_interval_s=0.02)
    response = await post(app, CHAT, stream=True)
    assert response.status_code == 200
    *keepalives, error, done = parse(response.content)
    assert keepalives and keepalives == [Comment(" keep-alive")] * len(keepalives)
    assert isinstance(error, Event) and isinstance(done, Event)
    assert_openai_error(error.json(), code="first_token_timeout")
    assert done.done


async def test_generate_stream_ends_with_an_error_event() -> None:
    failure = EngineFailure("the engine died", code="engine_error")
    app = gateway(ScriptedEngine(after_hello(failure)))
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.post("/generate", json={"prompt": "hi", "max_tokens": 8})
    assert response.status_code == 200
    *tokens, last = parse_events(response.content)
    assert [(t.event, t.json()) for t in tokens] == [
        ("message", {"token": t}) for t in ("Hel", "lo")
    ]
    assert (last.event, last.json()) == ("error", error_body(failure))


async def test_bug_after_the_first_byte_is_an_in_band_internal_error_without_details() -> None:
    bug = RuntimeError("secret at /srv/llmserve/engine.py")
    response = await post(gateway(ScriptedEngine(after_hello(bug))), CHAT, stream=True)
    assert response.status_code == 200
    *_, error, done = parse_events(response.content)
    assert error.json() == error_body(LLMServeError("internal server error"))
    assert done.done
    assert "secret" not in response.text and "Traceback" not in response.text


async def test_whole_response_failing_mid_generation_is_a_whole_error_body() -> None:
    # Not streamed: nothing was sent when the engine failed, so the status can still say so.
    failure = EngineFailure("the upstream stream broke", code="upstream_broken_stream")
    response = await post(gateway(ScriptedEngine(after_hello(failure))), CHAT, stream=False)
    assert assert_openai_error(response, 502) == error_body(failure)["error"]
