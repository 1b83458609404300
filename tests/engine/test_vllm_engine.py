"""The real vLLM CPU engine with the embedded model, through the official openai client.

The in-process engine and a managed `vllm serve` (for the routing test) are loaded once for the
whole module (≈35 s on 2 cores); every test shares its event loop. The `vllm serve` disconnect
test has its own module (test_vllm_serve.py says why).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionContentPartImageParam, ChatCompletionMessageParam

from llmserve.config import Settings, VllmModel
from llmserve.embedded.smollm2 import ensure_embedded_model
from llmserve.engines.vllm_engine import VllmEngine
from tests.conftest import RunningServer, serve
from tests.engine.examples import PERSON_SCHEMA, weather_call
from tests.engine.hang_up import stream_then_hang_up
from tests.engine.served import SERVED, served_model, vllm_serve_metric
from tests.engine.test_vllm_serve import TRANSPARENT, _assert_same, _gathered
from tests.routing.helpers import wait_ready
from tests.support.errors import assert_openai_error
from tests.support.eventually import eventually

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]

MODEL = "smollm2-135m-instruct"
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]
# An aborted 2000-token request must be gone within this; left to run, it takes ~120 s.
IDLE_WITHIN_S = 60


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def vllm_server() -> AsyncIterator[RunningServer]:
    settings = Settings(
        models=[
            VllmModel(engine_args={"max_model_len": 2048}),
            served_model(),
        ]
    )
    async with serve(settings) as running:
        await wait_ready(running.url, within_s=400)
        try:
            yield running
        finally:
            while _sdk_clients:
                await _sdk_clients.pop().close()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_embedded_model(Settings().cache_dir))


# Closed with the server, in the module's event loop: an SDK client left to garbage collection
# schedules its own close on whatever loop runs then, and fails there (another test's loop).
_sdk_clients: list[AsyncOpenAI] = []


def client(server: RunningServer) -> AsyncOpenAI:
    sdk = AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    _sdk_clients.append(sdk)
    return sdk


def engine(server: RunningServer) -> VllmEngine:
    found = server.models.get(MODEL)
    assert isinstance(found, VllmEngine)
    return found


async def test_chat_answers_with_usage_matching_the_tokenizer(
    vllm_server: RunningServer, tokenizer: Any
) -> None:
    reply = await client(vllm_server).chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.content and choice.message.content.strip()
    expected = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == len(expected["input_ids"])
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 24
    assert "Paris" in choice.message.content


async def test_the_collector_no_longer_walks_the_loaded_engine(vllm_server: RunningServer) -> None:
    """vLLM and torch leave some 600,000 long-lived objects in the gateway's process; a full
    collection walking them stalls the event loop, and every stream on it, for 0.3 s or more.
    Once the engine has loaded they are frozen: what a collection walks is only what the
    gateway made since (the tests' own objects included), a small fraction of that."""
    await client(vllm_server).chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
    assert gc.get_freeze_count() > 300_000
    assert len(gc.get_objects()) < 150_000


async def test_completion_length_and_prompt_tokens(
    vllm_server: RunningServer, tokenizer: Any
) -> None:
    prompt = "The three primary colours are"
    reply = await client(vllm_server).completions.create(
        model=MODEL, prompt=prompt, max_tokens=7, temperature=0
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].text
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 7
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt))


async def test_stop_sequence_ends_with_stop(vllm_server: RunningServer) -> None:
    api = client(vllm_server)
    free = await api.completions.create(
        model=MODEL, prompt="Count: one, two, three,", max_tokens=12, temperature=0
    )
    text = free.choices[0].text
    words = [w for w in text.split() if w.strip(",.")]
    assert len(words) >= 2, text
    stop = words[1]
    stopped = await api.completions.create(
        model=MODEL, prompt="Count: one, two, three,", max_tokens=12, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in stopped.choices[0].text
    assert text.startswith(stopped.choices[0].text)


async def test_streamed_chat_equals_whole_chat(vllm_server: RunningServer) -> None:
    api = client(vllm_server)
    whole = await api.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=16, temperature=0
    )
    pieces, usage, finish = [], None, None
    stream = await api.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert len([p for p in pieces if p]) > 3  # delivered in many pieces, not one


async def test_n_logprobs_and_seed(vllm_server: RunningServer) -> None:
    reply = await client(vllm_server).chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=5,
        n=2,
        temperature=1.0,
        seed=7,
        logprobs=True,
        top_logprobs=2,
    )
    assert sorted(c.index for c in reply.choices) == [0, 1]
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
        assert all(t.logprob <= 0 for t in choice.logprobs.content)
    assert reply.usage is not None
    assert reply.usage.completion_tokens == sum(
        len(c.logprobs.content) for c in reply.choices if c.logprobs and c.logprobs.content
    )


async def test_bad_requests_get_openai_errors(vllm_server: RunningServer) -> None:
    api = client(vllm_server)
    with pytest.raises(openai.BadRequestError) as too_long:
        await api.completions.create(model=MODEL, prompt="word " * 3000, max_tokens=5)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        await api.completions.create(model="no-such-model", prompt="hi", max_tokens=5)


def idle(server: RunningServer) -> Callable[[], bool]:
    return lambda: engine(server).unfinished_requests() == 0


async def test_disconnect_mid_stream_aborts_the_vllm_request(vllm_server: RunningServer) -> None:
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 2000,
        "stream": True,
        "ignore_eos": True,
    }
    async with stream_then_hang_up(vllm_server.url, body):
        assert engine(vllm_server).unfinished_requests() == 1
    # 2000 tokens at ~17 tok/s take about two minutes: idle well before means it was aborted.
    # Not 5 s: this process has gone without CPU for tens of seconds while a vLLM engine
    # generated on a two-core runner (see test_vllm_serve.py).
    await eventually(idle(vllm_server), IDLE_WITHIN_S, "the engine idle", 0.05)


async def test_disconnect_while_waiting_aborts_a_whole_request(
    vllm_server: RunningServer,
) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000}
    async with httpx.AsyncClient(base_url=vllm_server.url, timeout=1.5) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/completions", json=body)
    await eventually(idle(vllm_server), IDLE_WITHIN_S, "the engine idle", 0.05)


async def test_metrics_show_vllm_and_llmserve_series(vllm_server: RunningServer) -> None:
    await client(vllm_server).completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    async with httpx.AsyncClient(base_url=vllm_server.url) as http:
        text = (await http.get("/metrics")).text
    # vLLM's own metrics stay visible in in-process mode, beside the gateway's.
    assert "vllm:num_requests_running" in text
    assert "vllm:kv_cache_usage_perc" in text
    assert f'llmserve_generation_tokens_total{{key="anonymous",model="{MODEL}"}}' in text
    assert f'llmserve_requests_in_flight{{model="{MODEL}"}} 0.0' in text


# ---------------------------------------------------------------------------------------------
# One gateway, two engines: in process, and a real `vllm serve` it manages
# ---------------------------------------------------------------------------------------------


async def test_requests_are_routed_by_model_name_to_each_engine(
    vllm_server: RunningServer,
) -> None:
    api = client(vllm_server)
    served_before = await vllm_serve_metric(vllm_server, "vllm:request_success_total")
    local_before = engine(vllm_server).unfinished_requests()
    local, remote = await asyncio.gather(
        api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0),
        api.chat.completions.create(model=SERVED, messages=QUESTION, max_tokens=12, temperature=0),
    )
    assert local.model == MODEL
    assert remote.model == SERVED
    # The same weights, greedy, fp32 on both sides: the same answer.
    assert local.choices[0].message.content == remote.choices[0].message.content
    assert "Paris" in (remote.choices[0].message.content or "")
    assert await vllm_serve_metric(vllm_server, "vllm:request_success_total") == served_before + 1
    assert engine(vllm_server).unfinished_requests() == local_before == 0
    listed = {m.id for m in (await api.models.list()).data}
    assert {MODEL, SERVED} <= listed


# --- vLLM's OpenAI layer in process: the fields vLLM serves reach it with vLLM's meaning ---


async def test_json_schema_output_validates(vllm_server: RunningServer) -> None:
    import json

    import jsonschema

    reply = await client(vllm_server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe Ann, aged 30, as JSON."}],
        max_tokens=80,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA},
        },
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), PERSON_SCHEMA)


async def test_sdk_parse_gives_the_pydantic_object(vllm_server: RunningServer) -> None:
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    reply = await client(vllm_server).chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe Ann, aged 30."}],
        max_tokens=80,
        temperature=0,
        response_format=Person,
    )
    assert isinstance(reply.choices[0].message.parsed, Person)


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
async def test_tool_choice_gives_a_valid_call_streamed_or_not(
    vllm_server: RunningServer, tool_choice: Any
) -> None:
    import json

    api = client(vllm_server)
    options = weather_call(MODEL, tool_choice)
    whole = await api.chat.completions.create(**options)
    calls = whole.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    arguments = json.loads(calls[0].function.arguments)
    assert isinstance(arguments["city"], str)
    name, streamed = "", ""
    async for chunk in await api.chat.completions.create(**options, stream=True):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                name += (call.function and call.function.name) or ""
                streamed += (call.function and call.function.arguments) or ""
    assert name == "get_weather"
    assert json.loads(streamed) == arguments


async def test_auto_tool_choice_is_served_with_the_xlam_parser(vllm_server: RunningServer) -> None:
    """``auto`` needs a parser and auto tool choice on (the embedded default has both): the
    model decides; whatever it decides is reported consistently, a parsed call with the
    ``tool_calls`` finish reason, or text with ``stop`` / ``length``."""
    import json

    reply = await client(vllm_server).chat.completions.create(**weather_call(MODEL, "auto"))
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls[0].function.name == "get_weather"
        assert isinstance(json.loads(choice.message.tool_calls[0].function.arguments), dict)
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.content


async def test_structured_outputs_choice_and_regex_hold(vllm_server: RunningServer) -> None:
    api = client(vllm_server)
    choice = await api.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        max_tokens=10,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert choice.choices[0].message.content in ("yes", "no")
    regex = await api.completions.create(
        model=MODEL,
        prompt="A phone number: ",
        max_tokens=20,
        extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}},
    )
    import re

    assert re.fullmatch(r"\d{3}-\d{4}", regex.choices[0].text)


async def test_min_tokens_is_honoured(vllm_server: RunningServer) -> None:
    reply = await client(vllm_server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say OK."}],
        max_tokens=40,
        temperature=0,
        extra_body={"min_tokens": 30},
    )
    assert reply.usage is not None and reply.usage.completion_tokens >= 30


async def test_echo_with_logprobs_returns_the_prompt_tokens(vllm_server: RunningServer) -> None:
    prompts = ["The capital of France is", "One two three"]
    reply = await client(vllm_server).completions.create(
        model=MODEL, prompt=prompts, max_tokens=3, echo=True, logprobs=1, temperature=0
    )
    assert len(reply.choices) == 2
    for prompt, choice in zip(prompts, reply.choices, strict=True):
        assert choice.text.startswith(prompt)
        assert choice.logprobs is not None and choice.logprobs.token_logprobs
        assert choice.logprobs.token_logprobs[0] is None  # the first token has no context
        assert all(lp is not None for lp in choice.logprobs.token_logprobs[1:])
    assert reply.usage is not None and reply.usage.completion_tokens == 6


async def test_unknown_fields_and_beam_search_are_refused_by_name(
    vllm_server: RunningServer,
) -> None:
    api = client(vllm_server)
    with pytest.raises(openai.BadRequestError) as unknown:
        await api.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=5, extra_body={"no_such_field": 1}
        )
    assert unknown.value.param == "no_such_field"
    with pytest.raises(openai.BadRequestError) as beam:
        await api.completions.create(
            model=MODEL, prompt="hi", max_tokens=5, extra_body={"use_beam_search": True}
        )
    assert beam.value.param == "use_beam_search"
    with pytest.raises(openai.BadRequestError) as request_id:
        await api.completions.create(
            model=MODEL, prompt="hi", max_tokens=5, extra_body={"request_id": "mine"}
        )
    assert request_id.value.param == "request_id"
    # vLLM's own validators raise its own errors, not pydantic's: still a 400 naming the field.
    with pytest.raises(openai.BadRequestError) as options:
        await api.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=5, stream_options={"include_usage": True}
        )
    assert options.value.param == "stream_options"
    with pytest.raises(openai.BadRequestError) as too_many:
        await api.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10**6)
    assert too_many.value.param == "max_tokens"


# --- /tokenize and /detokenize: vLLM's own, in process and behind the gateway -----------------


async def test_tokenize_counts_as_the_chat_request_does_and_detokenize_inverts_it(
    vllm_server: RunningServer, tokenizer: Any
) -> None:
    async with httpx.AsyncClient(base_url=vllm_server.url, timeout=60) as http:
        chat = await http.post("/tokenize", json={"model": MODEL, "messages": QUESTION})
        assert chat.status_code == 200, chat.text
        expected = tokenizer.apply_chat_template(
            QUESTION, add_generation_prompt=True, return_dict=True
        )
        assert chat.json()["tokens"] == list(expected["input_ids"])
        assert chat.json()["count"] == len(expected["input_ids"])
        assert chat.json()["max_model_len"] == 2048
        text = await http.post("/tokenize", json={"prompt": "Hello world", "model": MODEL})
        ids = text.json()["tokens"]
        assert ids == tokenizer("Hello world")["input_ids"]
        back = await http.post("/detokenize", json={"model": MODEL, "tokens": ids})
        assert back.status_code == 200, back.text
        assert back.json()["prompt"] == "Hello world"
        unknown = await http.post("/tokenize", json={"model": MODEL, "prompt": "x", "nope": 1})
        assert_openai_error(unknown, 400, param="nope")
        # `vllm serve` behind the gateway is asked itself: the same model, the same tokens.
        served = await http.post("/tokenize", json={"model": SERVED, "messages": QUESTION})
        assert served.status_code == 200, served.text
        assert served.json()["tokens"] == chat.json()["tokens"]
        assert served.json()["max_model_len"] == 8192  # its own context (tests/engine/served.py)
        served_back = await http.post("/detokenize", json={"model": SERVED, "tokens": ids})
        assert served_back.json()["prompt"] == "Hello world"
        missing = await http.post("/detokenize", json={"model": "no-such", "tokens": [1]})
        assert missing.status_code == 404


# --- /v1/responses: vLLM's own Responses API, for in-process models --------------------------


async def test_responses_answer_whole_and_streamed(
    vllm_server: RunningServer, tokenizer: Any
) -> None:
    api = client(vllm_server)
    whole = await api.responses.create(
        model=MODEL, input="What is the capital of France?", max_output_tokens=24, temperature=0
    )
    assert "Paris" in whole.output_text
    assert whole.usage is not None and 0 < whole.usage.output_tokens <= 24
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
    )
    assert whole.usage.input_tokens == len(expected["input_ids"])
    text, kinds = "", []
    async with api.responses.stream(
        model=MODEL, input="What is the capital of France?", max_output_tokens=24, temperature=0
    ) as stream:
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert text == whole.output_text  # greedy: the same answer


async def test_responses_bounds_and_refusals_are_named(vllm_server: RunningServer) -> None:
    api = client(vllm_server)
    with pytest.raises(openai.BadRequestError) as background:
        await api.responses.create(model=MODEL, input="hi", background=True)
    assert background.value.param == "background"
    with pytest.raises(openai.BadRequestError) as too_long:
        await api.responses.create(model=MODEL, input="hi", max_output_tokens=10**6)
    assert too_long.value.param == "max_output_tokens"
    with pytest.raises(openai.BadRequestError) as upstream:  # bounded before it is forwarded
        await api.responses.create(model=SERVED, input="hi", background=True)
    assert upstream.value.param == "background"


async def test_an_image_for_a_text_only_model_is_a_400_not_a_silent_drop(
    vllm_server: RunningServer,
) -> None:
    image: ChatCompletionContentPartImageParam = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
    }
    with pytest.raises(openai.BadRequestError) as refused:
        await client(vllm_server).chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}
            ],
            max_tokens=5,
        )
    assert refused.value.status_code == 400
    assert "not a multimodal model" in refused.value.message  # vLLM's own refusal, relayed


async def test_a_chat_model_refuses_embeddings_by_name(vllm_server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await client(vllm_server).embeddings.create(model=MODEL, input="hello")
    assert refused.value.param == "model" and refused.value.code == "unsupported_model"


# --- The differential: in process against `vllm serve`, the same model ----------------------


@pytest.mark.parametrize(("path", "request_body"), TRANSPARENT)
async def test_in_process_answers_are_vllm_serves_own(
    vllm_server: RunningServer, path: str, request_body: dict[str, Any]
) -> None:
    """The two ways llmserve serves a model, vLLM's layer in the gateway and `vllm serve`
    behind it, on the same model (SmolLM2, fp32, eager) and the same greedy requests (a JSON
    schema, a required tool call, content parts with min_tokens, a batch with echo and
    logprobs): the same stream, field for field, but for the model's name and the engine's
    configuration hash."""
    gathered = []
    async with httpx.AsyncClient(base_url=vllm_server.url, timeout=240) as http:
        for model in (MODEL, SERVED):
            body = {**request_body, "model": model, "temperature": 0, "stream": True}
            body["stream_options"] = {"include_usage": True}
            r = await http.post(path, json=body)
            assert r.status_code == 200, r.text
            stream = _gathered(r.content)
            assert stream.pop("model") == model
            # vLLM's hash of the engine's configuration: the contexts differ (2048, 8192).
            assert stream.pop("system_fingerprint").startswith("vllm-")
            gathered.append(stream)
    _assert_same(gathered[0], gathered[1], "stream")
