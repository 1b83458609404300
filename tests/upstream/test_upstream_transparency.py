"""Upstream mode is transparent: the client's body reaches the upstream whole, and every field
the upstream streams reaches the client, streamed or gathered into one response.

The upstream is the fake of tests/support, answering as `vllm serve` does with a tool-call
parser and a reasoning parser on (the chunks below are the shapes vLLM 0.32 streams); the real
`vllm serve` is in tests/engine/test_vllm_serve.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from tests.auth.helpers import add_key, auth_settings, bearer
from tests.conftest import serve, simulated_settings
from tests.support.errors import assert_openai_error
from tests.support.fake_upstream import FakeUpstream, answer, sse_frames
from tests.support.sse import parse_events
from tests.upstream.test_upstream_engine import gateway_before, upstream_settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CONVERSATION: list[ChatCompletionMessageParam] = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Weather?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def chunk(choice: dict[str, Any] | None, usage: dict[str, Any] | None = None) -> bytes:
    body = {
        "id": "chatcmpl-up",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "sim",
        "choices": [choice] if choice else [],
        "usage": usage,
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


def delta(**fields: Any) -> dict[str, Any]:
    return {"index": 0, "delta": fields, "logprobs": None, "finish_reason": None}


def tool_calling_frames() -> tuple[bytes, ...]:
    """A reasoning model that thinks, then calls a tool in three pieces."""
    call = {
        "index": 0,
        "id": "call_9",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    pieces = [
        chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": piece}}]))
        for piece in ('{"city": ', '"Bergen"}')
    ]
    finish = {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
        "stop_reason": None,
    }
    usage = {
        "prompt_tokens": 40,
        "completion_tokens": 12,
        "total_tokens": 52,
        "prompt_tokens_details": {"cached_tokens": 32},
    }
    return (
        chunk(delta(role="assistant", content="")),
        chunk(delta(reasoning_content="The user wants")),
        chunk(delta(reasoning_content=" the weather.")),
        chunk(delta(tool_calls=[call])),
        *pieces,
        chunk(finish),
        chunk(None, usage),
        b"data: [DONE]\n\n",
    )


tool_calling = sse_frames(*tool_calling_frames())


def body(stream: bool, **extra: Any) -> dict[str, Any]:
    return {"model": "up", "messages": CONVERSATION, "stream": stream, "tools": TOOLS, **extra}


async def test_the_clients_body_reaches_the_upstream_whole() -> None:
    extra = {
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "min_tokens": 3,
        "repetition_penalty": 1.1,
        "chat_template_kwargs": {"enable_thinking": True},
        "continue_final_message": False,
        "add_generation_prompt": True,
        "max_completion_tokens": 30,
        "priority": 0,
        "stream_options": {"include_usage": False},
    }
    async with (
        gateway_before(tool_calling) as (b, fake),
        httpx.AsyncClient(base_url=b.url, timeout=10) as http,
    ):
        r = await http.post("/v1/chat/completions", json=body(False, **extra))
    assert r.status_code == 200, r.text
    [sent] = fake.bodies
    assert sent["model"] == "sim"  # the upstream's own name for the model
    assert sent["messages"] == CONVERSATION  # tool calls, tool results and image parts intact
    assert sent["tools"] == TOOLS
    for name in (
        "tool_choice",
        "response_format",
        "min_tokens",
        "repetition_penalty",
        "chat_template_kwargs",
        "continue_final_message",
        "add_generation_prompt",
        "max_completion_tokens",
    ):
        assert sent[name] == extra[name], name
    # llmserve's own: its queue honours the priority, and it always reads a stream with usage.
    assert "priority" not in sent
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


async def test_streamed_tool_calls_reasoning_and_usage_details_reach_the_client() -> None:
    async with gateway_before(tool_calling) as (b, _):
        client = AsyncOpenAI(base_url=b.url + "/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(
            model="up",
            messages=CONVERSATION,
            tools=TOOLS,
            stream=True,
            stream_options={"include_usage": True},
        )
        reasoning, arguments, names, reasons, usage = "", "", [], [], None
        async for part in stream:
            if part.usage is not None:
                usage = part.usage
            for choice in part.choices:
                reasoning += getattr(choice.delta, "reasoning_content", None) or ""
                for call in choice.delta.tool_calls or ():
                    if call.function and call.function.name:
                        names.append((call.id, call.function.name))
                    arguments += (call.function.arguments or "") if call.function else ""
                if choice.finish_reason:
                    reasons.append(choice.finish_reason)
        await client.close()
    assert reasoning == "The user wants the weather."
    assert names == [("call_9", "get_weather")]
    assert orjson.loads(arguments) == {"city": "Bergen"}
    assert reasons == ["tool_calls"]  # not rewritten to "stop"
    assert usage is not None and usage.prompt_tokens == 40 and usage.completion_tokens == 12
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 32


async def test_a_whole_response_gathers_tool_calls_and_reasoning() -> None:
    async with (
        gateway_before(tool_calling) as (b, _),
        httpx.AsyncClient(base_url=b.url, timeout=10) as http,
    ):
        r = await http.post("/v1/chat/completions", json=body(False))
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert message["content"] is None  # only tool calls, as OpenAI answers
    assert message["reasoning_content"] == "The user wants the weather."
    assert message["tool_calls"] == [
        {
            "id": "call_9",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Bergen"}'},
        }
    ]
    assert "stop_reason" in choice and choice["stop_reason"] is None
    assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"min_tokens": 2}, "min_tokens"),
        (
            {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
            "stream_options.continuous_usage_stats",
        ),
    ],
)
async def test_an_engine_that_cannot_honour_a_field_refuses_it_by_name(
    extra: dict[str, Any], param: str
) -> None:
    """The simulated engine (a test double of llmserve's own) serves only what llmserve
    models: anything else is a 400 naming it, never accepted and ignored."""
    request = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], **extra}
    async with (
        serve(simulated_settings()) as running,
        httpx.AsyncClient(base_url=running.url, timeout=10) as http,
    ):
        r = await http.post("/v1/chat/completions", json=request)
    assert_openai_error(r, 400, param=param, code="unknown_field")


@pytest.mark.parametrize(
    ("messages", "param", "code"),
    [
        (CONVERSATION[:1], "messages.0.content.1", "unsupported_content"),
        (
            [*CONVERSATION[1:2], {"role": "user", "content": "hi"}],
            "messages.0.tool_calls",
            "unknown_field",
        ),
        ([CONVERSATION[2]], "messages.0.tool_call_id", "unknown_field"),
    ],
)
async def test_messages_the_engine_cannot_render_are_refused_by_name(
    messages: list[dict[str, Any]], param: str, code: str
) -> None:
    async with (
        serve(simulated_settings()) as running,
        httpx.AsyncClient(base_url=running.url, timeout=10) as http,
    ):
        r = await http.post("/v1/chat/completions", json={"model": "sim", "messages": messages})
    assert_openai_error(r, 400, param=param, code=code)


# --- /v1/embeddings: forwarded whole, answered whole ------------------------------------------

EMBEDDINGS_ANSWER = {
    "id": "embd-up",
    "object": "list",
    "created": 7,
    "model": "sim",
    "data": [
        {"index": 0, "object": "embedding", "embedding": [0.6, 0.8]},
        {"index": 1, "object": "embedding", "embedding": "AACAPwAAAAA="},
    ],
    "usage": {"prompt_tokens": 9, "total_tokens": 9, "completion_tokens": 0},
    "system_fingerprint": "fp-up",  # a field llmserve does not model
}


embeddings = answer(EMBEDDINGS_ANSWER)


async def test_an_embeddings_request_reaches_the_upstream_whole_and_its_answer_the_client() -> None:
    sent_body = {
        "model": "up",
        "input": ["first text", "second text"],
        "encoding_format": "float",
        "dimensions": 2,
        "truncate_prompt_tokens": 16,  # vLLM's own
        "priority": 3,
        "user": "u1",
    }
    async with (
        gateway_before(embeddings) as (b, fake),
        httpx.AsyncClient(base_url=b.url, timeout=10) as http,
    ):
        before = prompt_tokens((await http.get("/metrics")).text)
        r = await http.post("/v1/embeddings", json=sent_body)
        after = prompt_tokens((await http.get("/metrics")).text)
    assert r.status_code == 200, r.text
    [sent] = fake.bodies
    assert fake.requests[0].path == "/v1/embeddings"
    expected = {k: v for k, v in sent_body.items() if k != "priority"}  # the queue's, kept
    assert sent == {**expected, "model": "sim"}  # nothing streamed, nothing else changed
    answer = r.json()
    assert answer["data"] == EMBEDDINGS_ANSWER["data"]
    assert answer["system_fingerprint"] == "fp-up"
    assert answer["usage"] == EMBEDDINGS_ANSWER["usage"]
    assert answer["model"] == "up" and answer["id"].startswith("embd-")
    assert answer["id"] != "embd-up"  # llmserve's id, as for every response
    assert after - before == 9  # counted with the upstream's own token count


def prompt_tokens(metrics: str) -> float:
    series = 'llmserve_prompt_tokens_total{key="anonymous",model="up"} '
    lines = [line for line in metrics.splitlines() if line.startswith(series)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


async def test_embeddings_errors_of_the_upstream_and_bounds_are_named() -> None:
    error = {"message": "dimensions not supported", "type": "BadRequestError", "param": None}
    refuse = answer({"error": {**error, "code": 400}}, 400)

    async with (
        gateway_before(refuse) as (b, fake),
        httpx.AsyncClient(base_url=b.url, timeout=10) as http,
    ):
        refused = await http.post("/v1/embeddings", json={"model": "up", "input": "x"})
        missing = await http.post("/v1/embeddings", json={"model": "up"})
        many = await http.post("/v1/embeddings", json={"model": "up", "input": ["x"] * 2049})
        simulated = await http.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    assert_openai_error(refused, 400, message_contains="dimensions not supported")
    assert_openai_error(missing, 400, param="input")
    assert_openai_error(many, 400, param="input")
    assert simulated.status_code == 404
    assert len(fake.requests) == 1  # only the valid one was sent


async def test_a_simulated_model_refuses_embeddings_by_name() -> None:
    async with (
        serve(simulated_settings()) as a,
        httpx.AsyncClient(base_url=a.url, timeout=10) as http,
    ):
        r = await http.post("/v1/embeddings", json={"model": "sim", "input": "x"})
    assert_openai_error(r, 400, param="model", code="unsupported_model")


# --- /v1/responses: forwarded, its named events relayed --------------------------------------

RESPONSE = {
    "id": "resp_up1",
    "object": "response",
    "created_at": 1,
    "model": "sim",
    "status": "in_progress",
    "output": [],
    "usage": None,
}
DONE_RESPONSE = {
    **RESPONSE,
    "status": "completed",
    "output": [{"type": "message", "content": [{"type": "output_text", "text": "Paris."}]}],
    "usage": {"input_tokens": 11, "output_tokens": 2, "total_tokens": 13},
}
RESPONSES_EVENTS: list[dict[str, Any]] = [
    {"type": "response.created", "sequence_number": 0, "response": RESPONSE},
    {"type": "response.output_text.delta", "sequence_number": 1, "delta": "Paris", "item_id": "m"},
    {"type": "response.output_text.delta", "sequence_number": 2, "delta": ".", "item_id": "m"},
    {"type": "response.completed", "sequence_number": 3, "response": DONE_RESPONSE},
]


responses_stream = sse_frames(
    *(
        f"event: {event['type']}\ndata: ".encode() + orjson.dumps(event) + b"\n\n"
        for event in RESPONSES_EVENTS
    )
)


async def test_a_responses_stream_is_relayed_event_for_event() -> None:
    body = {"model": "up", "input": "Capital of France?", "stream": True, "priority": 1}
    body["max_output_tokens"] = 16
    body["text"] = {"format": {"type": "text"}}  # a field llmserve does not model: forwarded
    async with (
        gateway_before(responses_stream) as (b, fake),
        httpx.AsyncClient(base_url=b.url, timeout=10) as http,
    ):
        r = await http.post("/v1/responses", json=body)
        whole = await http.post("/v1/responses", json={**body, "stream": False})
    assert r.status_code == 200, r.text
    events = parse_events(r.content)
    assert [e.event for e in events] == [e["type"] for e in RESPONSES_EVENTS]
    for event, sent in zip(events, RESPONSES_EVENTS, strict=True):
        expected = dict(sent)
        if "response" in sent:  # the client's model name; the upstream's ids stay
            expected["response"] = {**sent["response"], "model": "up"}
        assert event.json() == expected
    first, second = fake.bodies
    assert {r.path for r in fake.requests} == {"/v1/responses"}
    assert "priority" not in first and first["model"] == "sim" and first["stream"] is True
    assert first["text"] == body["text"] and first["max_output_tokens"] == 16
    assert second["stream"] is True  # read as a stream, answered whole
    assert whole.status_code == 200, whole.text
    assert whole.json() == {**DONE_RESPONSE, "model": "up"}


async def test_responses_bounds_hold_for_an_upstream() -> None:
    async with (
        gateway_before(responses_stream) as (b, fake),
        httpx.AsyncClient(base_url=b.url, timeout=10) as http,
    ):
        background = await http.post(
            "/v1/responses", json={"model": "up", "input": "x", "background": True}
        )
        too_long = await http.post(
            "/v1/responses", json={"model": "up", "input": "x", "max_output_tokens": 10**6}
        )
    assert_openai_error(background, 400, param="background")
    assert_openai_error(too_long, 400, param="max_output_tokens")
    assert fake.requests == []


async def test_token_id_prompts_are_forwarded_and_counted_exactly() -> None:
    choice = {"index": 0, "text": "ok", "finish_reason": "stop"}
    usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    completion = sse_frames(
        b"data: " + orjson.dumps({"choices": [choice]}) + b"\n\n",
        b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n",
        b"data: [DONE]\n\n",
    )

    async with (
        gateway_before(completion) as (b, fake),
        httpx.AsyncClient(base_url=b.url, timeout=10) as http,
    ):
        one = await http.post(
            "/v1/completions", json={"model": "up", "prompt": [1, 2, 3, 4, 5], "max_tokens": 2}
        )
        empty = await http.post("/v1/completions", json={"model": "up", "prompt": [[1], []]})
    assert one.status_code == 200, one.text
    assert fake.bodies[0]["prompt"] == [1, 2, 3, 4, 5]
    assert one.json()["usage"]["prompt_tokens"] == 5
    assert_openai_error(empty, 400, param="prompt")
    async with (
        serve(simulated_settings()) as a,
        httpx.AsyncClient(base_url=a.url, timeout=10) as http,
    ):
        refused = await http.post("/v1/completions", json={"model": "sim", "prompt": [1, 2]})
    assert_openai_error(refused, 400, param="prompt")


async def test_tool_schemas_and_images_count_toward_the_keys_quota(tmp_path: Path) -> None:
    """An upstream renders tools and images into the prompt: the quota's estimate counts them
    (the tools' JSON; a fixed share per media part), so a key is refused before the upstream
    sees a request its text alone would not show to be over the limit."""
    keys = tmp_path / "keys.yaml"
    key = add_key(keys, "small", tpm=600)
    async with FakeUpstream(tool_calling) as fake:
        models = list(upstream_settings(fake.url).models)
        async with (
            serve(auth_settings(keys, models=models)) as b,
            httpx.AsyncClient(base_url=b.url, timeout=10, headers=bearer(key)) as http,
        ):
            text = {"model": "up", "messages": [CONVERSATION[0] | {"content": "Weather?"}]}
            plain = await http.post("/v1/chat/completions", json={**text, "max_tokens": 8})
            with_image = await http.post(
                "/v1/chat/completions", json={**body(False), "max_tokens": 8}
            )
    assert plain.status_code == 200, plain.text
    assert with_image.status_code == 429, with_image.text  # 1,024 tokens for the image alone
    assert len(fake.requests) == 1
