"""A real `vllm serve` behind the gateway, alone: a client's disconnect aborts its request there.

Its own module, without the in-process engine of test_vllm_engine.py, on purpose. With that
engine loaded (idle) beside the gateway in this process's scheduling group, and `vllm serve`
generating in its own, the gateway got no CPU for a minute or more on a two-core runner (a
CPU-bound probe beside an idle vLLM engine: 0-2 % of a core, against 30-50 % without it). The
starved gateway could not abort the stream, so `vllm serve` generated on, and the test failed
at its bound. The cause is the two CPU engines on two cores, not the gateway.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from llmserve.config import Settings
from tests.conftest import RunningServer, serve
from tests.engine.examples import PERSON_SCHEMA, WEATHER_QUESTION, WEATHER_TOOL, weather_call
from tests.engine.hang_up import stream_then_hang_up
from tests.engine.served import SERVED, served_model, served_port, vllm_serve_metric
from tests.routing.helpers import wait_ready
from tests.support.eventually import eventually
from tests.support.sse import parse_events

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served_gateway() -> AsyncIterator[RunningServer]:
    async with serve(Settings(models=[served_model()])) as running:
        await wait_ready(running.url, within_s=400)
        yield running


async def test_streams_through_vllm_serve_and_a_disconnect_aborts_there(
    served_gateway: RunningServer,
) -> None:
    """A client that hangs up mid-stream gets its request aborted in `vllm serve`: the request
    stops running long before the 4,000 tokens it asked for (about four minutes here), and vLLM
    never counts it finished (it counts only requests that end by themselves, not aborts).

    Bounds are generous and nothing is sampled while the stream runs: the abort needs this
    process to run, and a two-core runner busy with `vllm serve` gives it little CPU."""
    generated = "vllm:generation_tokens_total"
    finished = "vllm:request_success_total"
    assert await vllm_serve_metric(served_gateway, "vllm:num_requests_running") == 0
    tokens_before = await vllm_serve_metric(served_gateway, generated)
    finished_before = await vllm_serve_metric(served_gateway, finished)
    body = {"model": SERVED, "prompt": "Once upon a time", "max_tokens": 4000, "stream": True}
    body["ignore_eos"] = True
    async with stream_then_hang_up(served_gateway.url, body):
        pass  # three tokens in: the client hangs up

    async def abandoned() -> bool:
        return await vllm_serve_metric(served_gateway, "vllm:num_requests_running") == 0

    await eventually(abandoned, 240, "vllm serve no longer runs the abandoned request", 0.2)
    tokens = await vllm_serve_metric(served_gateway, generated) - tokens_before
    assert 3 <= tokens < 4000, f"{tokens:g} tokens generated"
    assert await vllm_serve_metric(served_gateway, finished) == finished_before, "it finished"


# --- Transparency: the gateway answers as `vllm serve` itself does, field for field ---------

# Greedy requests whose answers depend on fields the old gateway dropped or refused.
TRANSPARENT = [
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Describe Ann, aged 30, as JSON."}],
            "max_tokens": 60,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON_SCHEMA},
            },
        },
    ),
    (
        "/v1/chat/completions",
        {
            "messages": WEATHER_QUESTION,
            "tools": [WEATHER_TOOL],
            "tool_choice": "required",
            "max_tokens": 60,
        },
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "OK."}],
                }
            ],
            "max_tokens": 40,
            "min_tokens": 30,
            "repetition_penalty": 1.2,
        },
    ),
    (
        "/v1/completions",
        {
            "prompt": ["The capital of France is", "One two three"],
            "max_tokens": 3,
            "echo": True,
            "logprobs": 1,
        },
    ),
]


def _gathered(body: bytes) -> dict[str, Any]:
    """Everything a stream told its client, gathered per choice and without what differs
    between any two servers (ids, clocks) or means nothing (null fields; chunk boundaries:
    vLLM ends a completion choice in its last token's chunk, llmserve in a chunk of its own).
    Strings are joined and lists extended, as a client adds up a stream."""
    gathered: dict[str, Any] = {"choices": {}}
    for data in parse_events(body):
        if data.done:
            continue
        event = data.json()
        for choice in event.pop("choices", None) or ():
            for call in (choice.get("delta") or {}).get("tool_calls") or ():
                call.pop("id", None)  # random
            _add(gathered["choices"].setdefault(choice.pop("index"), {}), choice)
        _add(gathered, {k: v for k, v in event.items() if k not in ("id", "created")})
    return gathered


def _assert_same(ours: Any, theirs: Any, where: str) -> None:
    """Equal, but for logprobs within 1e-4: the same greedy request run twice by vLLM on CPU
    can differ in the 7th digit (other batch shapes, other float sums), not the gateway's doing."""
    if isinstance(ours, float) and isinstance(theirs, float):
        assert abs(ours - theirs) < 1e-4, f"{where}: {ours} != {theirs}"
    elif isinstance(ours, dict) and isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), f"{where}: {sorted(ours)} != {sorted(theirs)}"
        for key in ours:
            _assert_same(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, list) and isinstance(theirs, list):
        assert len(ours) == len(theirs), f"{where}: {len(ours)} != {len(theirs)} items"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


def _add(into: dict[str, Any], part: dict[str, Any]) -> None:
    for key, value in part.items():
        if value is None:
            continue
        held = into.get(key)
        if isinstance(held, str) and isinstance(value, str) and key not in ("object", "model"):
            into[key] = held + value
        elif isinstance(held, list) and isinstance(value, list):
            held.extend(value)
        elif isinstance(held, dict) and isinstance(value, dict):
            _add(held, value)
        else:
            into[key] = value


@pytest.mark.parametrize(("path", "request_body"), TRANSPARENT)
async def test_a_stream_through_the_gateway_is_vllm_serves_own(
    served_gateway: RunningServer, path: str, request_body: dict[str, Any]
) -> None:
    """Field for field, the same greedy stream as asking `vllm serve` directly, for requests
    whose answers hang on fields the old gateway dropped or refused."""
    body = {
        **request_body,
        "model": SERVED,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    port = served_port(served_gateway)
    async with httpx.AsyncClient(timeout=240) as http:
        direct = await http.post(f"http://127.0.0.1:{port}{path}", json=body)
        gateway = await http.post(f"{served_gateway.url}{path}", json=body)
    assert direct.status_code == 200, direct.text
    assert gateway.status_code == 200, gateway.text
    _assert_same(_gathered(gateway.content), _gathered(direct.content), "stream")


async def test_a_streamed_tool_call_through_the_gateway_is_vllm_serves(
    served_gateway: RunningServer,
) -> None:
    """The tool call's deltas and the `tool_calls` finish reason reach the client."""

    options = weather_call(SERVED, "required")
    api = AsyncOpenAI(base_url=served_gateway.url + "/v1", api_key="x", max_retries=0)
    whole = await api.chat.completions.create(**options)
    calls = whole.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    name, arguments, reasons = "", "", []
    async for chunk in await api.chat.completions.create(**options, stream=True):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                name += (call.function and call.function.name) or ""
                arguments += (call.function and call.function.arguments) or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    await api.close()
    assert name == "get_weather"
    assert json.loads(arguments) == json.loads(calls[0].function.arguments)
    assert reasons == [whole.choices[0].finish_reason]


async def test_responses_through_the_gateway_are_vllm_serves_own(
    served_gateway: RunningServer,
) -> None:
    """The Responses API, forwarded: the same greedy answer as `vllm serve` gives directly,
    whole and streamed, with the same usage; the stream's events are vLLM's, in order."""
    port = served_port(served_gateway)
    options: dict[str, Any] = dict(
        model=SERVED, input="What is the capital of France?", max_output_tokens=16, temperature=0
    )
    direct = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    gateway = AsyncOpenAI(base_url=served_gateway.url + "/v1", api_key="x", max_retries=0)
    try:
        theirs = await direct.responses.create(**options)
        ours = await gateway.responses.create(**options)
        kinds, text = [], ""
        async with gateway.responses.stream(**options) as stream:
            async for event in stream:
                kinds.append(event.type)
                if event.type == "response.output_text.delta":
                    text += event.delta
            final = await stream.get_final_response()
    finally:
        await direct.close()
        await gateway.close()
    assert ours.output_text == theirs.output_text and ours.output_text
    assert ours.usage is not None and theirs.usage is not None
    assert ours.usage.input_tokens == theirs.usage.input_tokens
    assert ours.usage.output_tokens == theirs.usage.output_tokens
    assert ours.model == SERVED
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert text == final.output_text == theirs.output_text
