"""The validation stage on its own: wire request + WordCodec + Limits → ValidatedRequest."""

from __future__ import annotations

from typing import Any

import pytest

from llmserve.config import Limits
from llmserve.engines.simulated import WordCodec
from llmserve.errors import ContextLengthExceeded, InvalidRequest
from llmserve.validation.request import ChatMessage, ValidatedRequest
from llmserve.validation.validate import validate_chat, validate_completion, validate_generate
from llmserve.wire.schema import ChatCompletionRequest, CompletionRequest, GenerateRequest

CONTEXT = 64
CODEC = WordCodec(CONTEXT)
LIMITS = Limits(
    max_tokens=100,
    default_max_tokens=16,
    max_n=4,
    max_stop_sequences=3,
    max_stop_sequence_chars=10,
    max_logprobs=5,
    max_messages=10,
)


def words(count: int) -> str:
    """A prompt of exactly ``count`` WordCodec tokens."""
    return " w" * count


def chat_wire(**fields: Any) -> ChatCompletionRequest:
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return ChatCompletionRequest.model_validate({"model": "sim", **fields})


def completion_wire(**fields: Any) -> CompletionRequest:
    fields.setdefault("prompt", "hello there")
    return CompletionRequest.model_validate({"model": "sim", **fields})


async def chat(limits: Limits = LIMITS, **fields: Any) -> ValidatedRequest:
    return await validate_chat(chat_wire(**fields), CODEC, limits)


async def completion(limits: Limits = LIMITS, **fields: Any) -> ValidatedRequest:
    return await validate_completion(completion_wire(**fields), CODEC, limits)


async def generate(**fields: Any) -> ValidatedRequest:
    wire = GenerateRequest.model_validate(fields)
    return await validate_generate(wire, "sim", CODEC, LIMITS)


async def invalid(coro: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        await coro
    return info.value


# --- happy path ---------------------------------------------------------------------------------


async def test_completion_carries_options_and_counts_prompt_tokens() -> None:
    req = await completion(
        prompt="one two three",
        max_tokens=5,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        seed=7,
        n=2,
        stop="x",
        presence_penalty=0.5,
        frequency_penalty=-0.5,
    )
    assert req.kind == "completion"
    assert req.model == "sim"
    assert req.request_id.startswith("cmpl-")
    assert req.prompt == "one two three"
    assert req.prompt_tokens == 3
    assert req.prompt_token_ids == tuple(CODEC.encode("one two three"))
    assert req.messages is None
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.n) == (5, 0.5, 0.9, 40, 7, 2)
    assert s.stop == ("x",)
    assert (s.presence_penalty, s.frequency_penalty) == (0.5, -0.5)
    assert s.logprobs is None


async def test_request_ids_are_unique_and_prefixed_by_kind() -> None:
    a, b = await chat(), await chat()
    assert a.request_id.startswith("chatcmpl-")
    assert a.request_id != b.request_id
    assert (await generate(prompt="hi")).request_id.startswith("gen-")


async def test_chat_renders_template_and_keeps_messages() -> None:
    req = await chat(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
        ]
    )
    assert req.kind == "chat"
    assert req.prompt == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    assert req.prompt_tokens == len(CODEC.encode(req.prompt))
    assert req.messages == (ChatMessage("system", "be brief"), ChatMessage("user", "hi"))


async def test_developer_role_is_mapped_to_system() -> None:
    req = await chat(messages=[{"role": "developer", "content": "rules"}])
    assert req.messages == (ChatMessage("system", "rules"),)
    assert "<|system|>\nrules\n" in req.prompt
    assert "developer" not in req.prompt


async def test_content_parts_are_joined_with_newlines_as_vllm_does_and_none_is_empty() -> None:
    req = await chat(
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}],
            },
            {"role": "assistant", "content": None},
        ]
    )
    # vLLM's chat renderer joins text parts with "\n": the same request, the same prompt.
    assert req.messages == (ChatMessage("user", "Hello, \nworld"), ChatMessage("assistant", ""))


async def test_generate_uses_given_model_and_sampling() -> None:
    req = await generate(prompt="a b c", max_tokens=3, temperature=0.0, seed=1, stop=["z"])
    assert req.kind == "generate"
    assert req.model == "sim"
    assert req.prompt_tokens == 3
    assert req.sampling.max_tokens == 3
    assert req.sampling.stop == ("z",)
    assert req.sampling.n == 1
    assert req.sampling.logprobs is None


# --- n -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, LIMITS.max_n])
async def test_n_within_limit_is_accepted(n: int) -> None:
    assert (await chat(n=n)).sampling.n == n
    assert (await completion(n=n)).sampling.n == n


async def test_n_over_limit_is_rejected() -> None:
    exc = await invalid(chat(n=LIMITS.max_n + 1))
    assert exc.param == "n"
    assert exc.status == 400
    assert str(LIMITS.max_n) in exc.message
    assert (await invalid(completion(n=LIMITS.max_n + 1))).param == "n"


def test_n_below_one_fails_the_wire_schema() -> None:
    with pytest.raises(ValueError):
        chat_wire(n=0)


# --- stop --------------------------------------------------------------------------------------


async def test_single_stop_string_becomes_a_tuple() -> None:
    assert (await chat(stop="END")).sampling.stop == ("END",)
    assert (await chat()).sampling.stop == ()


async def test_stop_sequences_at_the_limits_are_accepted() -> None:
    stops = ["a" * LIMITS.max_stop_sequence_chars] * LIMITS.max_stop_sequences
    assert (await completion(stop=stops)).sampling.stop == tuple(stops)


async def test_too_many_stop_sequences_are_rejected() -> None:
    exc = await invalid(completion(stop=["a"] * (LIMITS.max_stop_sequences + 1)))
    assert exc.param == "stop"
    assert str(LIMITS.max_stop_sequences) in exc.message


async def test_too_long_stop_sequence_is_rejected() -> None:
    exc = await invalid(chat(stop=["ok", "b" * (LIMITS.max_stop_sequence_chars + 1)]))
    assert exc.param == "stop"
    assert str(LIMITS.max_stop_sequence_chars) in exc.message


@pytest.mark.parametrize("stop", ["", ["ok", ""]])
async def test_empty_stop_sequence_is_rejected(stop: Any) -> None:
    exc = await invalid(chat(stop=stop))
    assert exc.param == "stop"
    assert "empty" in exc.message


async def test_stop_limits_apply_to_generate_too() -> None:
    exc = await invalid(generate(prompt="x", stop=["a"] * (LIMITS.max_stop_sequences + 1)))
    assert exc.param == "stop"


# --- logprobs ----------------------------------------------------------------------------------


async def test_chat_logprobs() -> None:
    assert (await chat()).sampling.logprobs is None
    assert (await chat(logprobs=True)).sampling.logprobs == 0
    assert (await chat(logprobs=True, top_logprobs=3)).sampling.logprobs == 3
    assert (await chat(logprobs=True, top_logprobs=LIMITS.max_logprobs)).sampling.logprobs == (
        LIMITS.max_logprobs
    )


async def test_chat_top_logprobs_over_limit_is_rejected() -> None:
    exc = await invalid(chat(logprobs=True, top_logprobs=LIMITS.max_logprobs + 1))
    assert exc.param == "top_logprobs"


async def test_chat_top_logprobs_without_logprobs_is_rejected() -> None:
    exc = await invalid(chat(top_logprobs=2))
    assert exc.param == "top_logprobs"
    assert "logprobs" in exc.message


async def test_completion_logprobs() -> None:
    assert (await completion()).sampling.logprobs is None
    assert (await completion(logprobs=0)).sampling.logprobs == 0
    assert (await completion(logprobs=LIMITS.max_logprobs)).sampling.logprobs == 5
    exc = await invalid(completion(logprobs=LIMITS.max_logprobs + 1))
    assert exc.param == "logprobs"


# --- max_tokens and the context ----------------------------------------------------------------


async def test_max_tokens_cap() -> None:
    big = Limits(max_tokens=10)
    assert (await completion(big, max_tokens=10)).sampling.max_tokens == 10
    exc = await invalid(completion(big, max_tokens=11))
    assert exc.param == "max_tokens"
    assert "10" in exc.message
    assert not isinstance(exc, ContextLengthExceeded)


async def test_max_completion_tokens_wins_over_max_tokens_and_is_capped() -> None:
    req = await chat(max_tokens=5, max_completion_tokens=7)
    assert req.sampling.max_tokens == 7
    assert (await invalid(chat(max_completion_tokens=LIMITS.max_tokens + 1))).param == (
        "max_tokens"
    )


async def test_default_max_tokens_when_room_is_plenty() -> None:
    req = await completion(prompt=words(10))
    assert req.sampling.max_tokens == LIMITS.default_max_tokens


async def test_default_max_tokens_is_clipped_to_room_left() -> None:
    req = await completion(prompt=words(CONTEXT - 5))
    assert req.sampling.max_tokens == 5
    req = await completion(prompt=words(CONTEXT - 1))
    assert req.sampling.max_tokens == 1


async def test_requested_max_tokens_filling_the_context_exactly_is_accepted() -> None:
    req = await completion(prompt=words(CONTEXT - 20), max_tokens=20)
    assert req.sampling.max_tokens == 20


async def test_requested_max_tokens_past_the_context_is_context_length_exceeded() -> None:
    with pytest.raises(ContextLengthExceeded) as info:
        await completion(prompt=words(CONTEXT - 20), max_tokens=21)
    exc = info.value
    assert exc.status == 400
    assert exc.code == "context_length_exceeded"
    assert exc.param == "max_tokens"
    assert str(CONTEXT) in exc.message


@pytest.mark.parametrize("tokens", [CONTEXT, CONTEXT + 30])
async def test_prompt_filling_the_context_is_context_length_exceeded(tokens: int) -> None:
    with pytest.raises(ContextLengthExceeded) as info:
        await completion(prompt=words(tokens))
    assert info.value.code == "context_length_exceeded"
    assert str(tokens) in info.value.message


async def test_long_chat_prompt_is_context_length_exceeded() -> None:
    with pytest.raises(ContextLengthExceeded):
        await chat(messages=[{"role": "user", "content": words(CONTEXT)}])


async def test_long_prompt_is_tokenised_off_the_event_loop_with_same_result() -> None:
    # Over 4096 characters takes the worker-thread path; the count must not change.
    codec = WordCodec(10_000)
    prompt = " abcdefgh" * 600  # 5400 characters, 600 tokens
    req = await validate_completion(completion_wire(prompt=prompt), codec, Limits())
    assert req.prompt_tokens == 600


# --- unsupported features ----------------------------------------------------------------------


async def test_batch_of_prompts_is_rejected() -> None:
    exc = await invalid(completion(prompt=["one", "two"]))
    assert exc.param == "prompt"
    assert "batch" in exc.message


async def test_empty_prompt_list_is_rejected() -> None:
    assert (await invalid(completion(prompt=[]))).param == "prompt"


async def test_list_of_one_prompt_is_accepted() -> None:
    req = await completion(prompt=["just one"])
    assert req.prompt == "just one"
    assert req.prompt_tokens == 2


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"echo": True}, "echo"),
        ({"suffix": "tail"}, "suffix"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"best_of": 3}, "best_of"),
        ({"best_of": 1, "n": 2}, "best_of"),
    ],
)
async def test_unsupported_completion_features_are_rejected(
    fields: dict[str, Any], param: str
) -> None:
    exc = await invalid(completion(**fields))
    assert exc.param == param
    assert exc.status == 400


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logit_bias": {"1": 1.0}}, "logit_bias"),
        ({"best_of": 2}, "best_of"),
    ],
)
async def test_unsupported_chat_features_are_rejected(fields: dict[str, Any], param: str) -> None:
    assert (await invalid(chat(**fields))).param == param


async def test_harmless_values_of_unsupported_features_are_accepted() -> None:
    req = await completion(echo=False, suffix="", logit_bias={}, best_of=2, n=2)
    assert req.sampling.n == 2
    assert (await chat(tools=[], best_of=1)).sampling.n == 1


async def test_too_many_messages_are_rejected() -> None:
    messages = [{"role": "user", "content": "x"}] * (LIMITS.max_messages + 1)
    assert (await invalid(chat(messages=messages))).param == "messages"
    messages = messages[: LIMITS.max_messages]
    assert len((await chat(messages=messages)).messages or ()) == LIMITS.max_messages
