"""A walk over every request field of the OpenAI API (as the official SDK types it) and of
vLLM's own request types: for an in-process model each one is either vLLM's, parsed into
vLLM's own request object with the value sent (so vLLM gives it its meaning), or refused with a
400 naming it. Nothing is accepted and ignored. Upstream and simulated engines get the same walk
in tests/upstream/test_field_walk.py.

A vLLM release that adds a field fails ``test_every_vllm_field_has_been_reviewed`` until the
field is looked at and listed here: that is the point.
"""

from __future__ import annotations

import typing
from typing import Any

import pytest
from openai.types import completion_create_params, embedding_create_params
from openai.types.chat import completion_create_params as chat_create_params
from pydantic import BaseModel

from llmserve.api.layer_routes import parse_vllm
from llmserve.engines import vllm_compat
from llmserve.errors import InvalidRequest

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
MESSAGES = [{"role": "user", "content": "hi"}]
# A valid value for each OpenAI field vLLM's types know, unlike its default.
SAMPLES: dict[str, Any] = {
    "frequency_penalty": 0.5,
    "logit_bias": {"100": 1.0},
    "logprobs": True,
    "max_completion_tokens": 5,
    "max_tokens": 5,
    "n": 2,
    "parallel_tool_calls": False,
    "presence_penalty": 0.5,
    "reasoning_effort": "low",
    "response_format": {"type": "json_object"},
    "seed": 7,
    "stop": ["x"],
    "stream_options": {"include_usage": True},
    "temperature": 0.5,
    "tool_choice": "none",
    "tools": [TOOL],
    "top_logprobs": 2,
    "top_p": 0.5,
    "user": "u",
    "echo": True,
    "suffix": "end",
    "dimensions": 8,
    "encoding_format": "base64",
}
COMPLETION_SAMPLES = {"logprobs": 2}  # an int in completions, a bool in chat
CASES = [
    # (vLLM's type, the SDK's params, the body's required fields)
    (
        "ChatCompletionRequest",
        chat_create_params.CompletionCreateParamsBase,
        {"messages": MESSAGES},
    ),
    ("CompletionRequest", completion_create_params.CompletionCreateParamsBase, {"prompt": "hi"}),
    ("EmbeddingRequest", embedding_create_params.EmbeddingCreateParams, {"input": "hi"}),
]
# vLLM's own fields beyond OpenAI's, each looked at: vLLM gives each its meaning, except these,
# which llmserve refuses by name (test_vllm_engine.py sends them): a beam search's cost has no
# bound the queue can see; request ids are llmserve's (gate, reservations, abort).
REFUSED_VLLM_FIELDS = {"use_beam_search", "request_id"}
REVIEWED_VLLM_FIELDS = {
    # sampling and output
    "min_p", "min_tokens", "repetition_penalty", "length_penalty", "top_k", "stop_token_ids",
    "bad_words", "allowed_token_ids", "ignore_eos", "include_stop_str_in_output",
    "skip_special_tokens", "spaces_between_special_tokens", "prompt_logprobs",
    "logprob_token_ids", "return_token_ids", "return_token_offsets",
    "return_tokens_as_token_ids", "return_prompt_text", "truncate_prompt_tokens",
    "truncation_side", "thinking_token_budget", "repetition_detection", "watermarking",
    "structured_outputs", "response_format", "echo", "include_reasoning", "vllm_xargs",
    # rendering
    "add_generation_prompt", "add_special_tokens", "continue_final_message", "chat_template",
    "chat_template_kwargs", "documents", "media_io_kwargs", "mm_processor_kwargs", "mm_payload",
    "return_mm_kwargs", "prompt_embeds", "padding",
    # embeddings
    "embed_dtype", "endianness", "use_activation",
    # scheduling and caching: priority is llmserve's queue's too (docs/api.md)
    "priority", "cache_salt", "kv_transfer_params", "ec_transfer_params", "session_id",
    "routed_experts_prompt_start", "stream", "stream_interval",
    *REFUSED_VLLM_FIELDS,
}  # fmt: skip


def _schema(name: str) -> Any:
    if name == "EmbeddingRequest":  # a union: its text member holds the OpenAI fields
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest

        return EmbeddingCompletionRequest
    return vllm_compat.vllm_type(name)


def _names(schema: type[BaseModel]) -> set[str]:
    return {n for name, f in schema.model_fields.items() for n in (name, f.alias) if n}


def _openai_fields(params: Any) -> set[str]:
    return set(typing.get_type_hints(params)) - {"model"}


@pytest.mark.parametrize(("schema_name", "params", "required"), CASES)
def test_every_openai_field_is_parsed_by_vllm_or_refused_by_name(
    schema_name: str, params: Any, required: dict[str, Any]
) -> None:
    schema = vllm_compat.vllm_type(schema_name)
    known = _names(_schema(schema_name))
    refused, honoured = [], []
    for field in sorted(_openai_fields(params) - set(required)):
        body = {"model": "m", **required}
        if field not in known:
            body[field] = {"sent": True}  # any value: unknown fields are refused unparsed
            with pytest.raises(InvalidRequest) as error:
                parse_vllm(schema, body)
            assert error.value.param == field, field
            refused.append(field)
            continue
        sample = SAMPLES[field]
        if schema_name == "CompletionRequest":
            sample = COMPLETION_SAMPLES.get(field, sample)
        # Fields vLLM accepts only beside another (refused alone, with a 400 naming them).
        if field == "stream_options":
            body["stream"] = True
        if field == "top_logprobs":
            body["logprobs"] = True
        wire = parse_vllm(schema, {**body, field: sample})
        value = getattr(wire, field)
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_unset=True)
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            value = [v.model_dump(exclude_unset=True) for v in value]
        assert value == sample, field  # in vLLM's request object, as sent
        honoured.append(field)
    assert honoured  # the walk walked
    if schema_name == "ChatCompletionRequest":
        # OpenAI-only features vLLM has no meaning for: a 400 each, never a silent drop.
        assert {"audio", "metadata", "store", "service_tier", "prediction"} <= set(refused)


@pytest.mark.parametrize(("schema_name", "params", "required"), CASES)
def test_every_vllm_field_has_been_reviewed(
    schema_name: str, params: Any, required: dict[str, Any]
) -> None:
    extra = _names(_schema(schema_name)) - _openai_fields(params) - set(required) - {"model"}
    assert extra - REVIEWED_VLLM_FIELDS == set()


def test_vllms_own_validation_errors_are_400s_naming_the_field() -> None:
    """vLLM's validators raise its own client errors, not pydantic's: still a 400."""
    schema = vllm_compat.vllm_type("ChatCompletionRequest")
    body = {"model": "m", "messages": MESSAGES, "stream_options": {"include_usage": True}}
    with pytest.raises(InvalidRequest) as error:
        parse_vllm(schema, body)
    assert error.value.param == "stream_options"
