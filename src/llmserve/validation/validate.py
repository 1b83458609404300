"""The validation stage: wire request + engine codec + limits → ``ValidatedRequest``.

Static bounds (types, ranges) are checked by the wire schema; this stage checks the configurable
limits, renders and counts the prompt, and fits max_tokens into the model's context.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, cast

import orjson
from pydantic import BaseModel

from llmserve.config import Limits
from llmserve.errors import ContextLengthExceeded, InvalidRequest
from llmserve.validation.codec import PromptCodec
from llmserve.validation.request import (
    ChatMessage,
    RequestKind,
    SamplingOptions,
    ValidatedRequest,
)
from llmserve.wire.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    GenerateRequest,
    ResponsesRequest,
    SamplingFields,
    WireMessage,
)

# A media part's share of an upstream prompt, for the estimate: images cost a multimodal model
# hundreds to a few thousand tokens (LLaVA 576, Qwen2-VL about 1,000 per megapixel).
MEDIA_PART_TOKENS = 1024
# Prompts longer than this are tokenised on a worker thread so the event loop keeps serving streams.
_INLINE_TOKENIZE_CHARS = 4096


_ID_PREFIXES = {
    "chat": "chatcmpl",
    "completion": "cmpl",
    "generate": "gen",
    "responses": "resp",
    "embeddings": "embd",
}


def new_request_id(kind: RequestKind) -> str:
    return f"{_ID_PREFIXES[kind]}-{os.urandom(16).hex()}"


def check_message_count(count: int, limits: Limits) -> None:
    """A conversation's length bound, the same for every route that takes messages."""
    if count > limits.max_messages:
        raise InvalidRequest(
            f"at most {limits.max_messages} messages are allowed", param="messages"
        )


async def validate_chat(
    wire: ChatCompletionRequest, codec: PromptCodec, limits: Limits, forwards: bool = False
) -> ValidatedRequest:
    """``forwards``: the engine takes the client's body whole and gives every field its own
    meaning (an upstream OpenAI server); otherwise only what llmserve models is served, and
    anything else is refused with a 400 naming it."""
    if not forwards:
        _refuse_unmodelled(wire)
        if wire.tools:
            raise InvalidRequest("tool calling is not supported by this model", param="tools")
    check_message_count(len(wire.messages), limits)
    messages = tuple(_chat_message(m) for m in wire.messages)
    prompt = codec.render_chat(messages)
    logprobs = None
    if wire.logprobs:
        logprobs = wire.top_logprobs or 0
    elif wire.top_logprobs is not None:
        raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    max_tokens = wire.max_completion_tokens or wire.max_tokens
    generation = await _build(
        wire,
        "chat",
        prompt,
        codec,
        limits,
        max_tokens,
        logprobs,
        "top_logprobs",
        messages,
        forwards,
    )
    if not forwards:
        return generation
    unseen = await _unrendered_tokens(wire, codec)
    return replace(generation, prompt_tokens=generation.prompt_tokens + unseen)


async def _unrendered_tokens(wire: ChatCompletionRequest, codec: PromptCodec) -> int:
    """What an upstream renders into the prompt beyond the messages' text, estimated for the
    quota and the queue (the upstream's usage settles it): the tool schemas and earlier tool
    calls, as their JSON, and a fixed share per image, audio or file part."""
    texts = [orjson.dumps(wire.tools).decode()] if wire.tools else []
    media = 0
    for message in wire.messages:
        calls = (message.model_extra or {}).get("tool_calls")
        if calls:
            texts.append(orjson.dumps(calls).decode())
        if isinstance(message.content, list):
            media += sum(part.type != "text" for part in message.content)
    tokens = len(await _encode(codec, "".join(texts), chat=False)) if texts else 0
    return tokens + media * MEDIA_PART_TOKENS


async def validate_completion(
    wire: CompletionRequest, codec: PromptCodec, limits: Limits, forwards: bool = False
) -> ValidatedRequest:
    if not forwards:
        _refuse_unmodelled(wire)
        if wire.echo:
            raise InvalidRequest("echo is not supported by this model", param="echo")
        if wire.suffix:
            raise InvalidRequest("suffix is not supported by this model", param="suffix")
    raw = wire.prompt
    token_ids = isinstance(raw, list) and bool(raw) and not isinstance(raw[0], str)
    id_prompts: list[list[int]] = []
    if token_ids and not forwards:
        raise InvalidRequest("token-id prompts are not served by this model", param="prompt")
    if token_ids:  # one list of ids, or several: counted exactly, whatever the tokenizer
        id_prompts = cast(list[list[int]], raw if isinstance(raw[0], list) else [raw])
        prompts = [""] * len(id_prompts)
    else:
        prompts = cast(list[str], raw if isinstance(raw, list) else [raw])
    if not prompts or (token_ids and not all(id_prompts)):
        raise InvalidRequest("the prompt must not be empty", param="prompt")
    if len(prompts) > 1 and not forwards:
        raise InvalidRequest(
            "send one prompt per request to this model (batches of prompts are served by "
            "upstream engines)",
            param="prompt",
        )
    if len(prompts) > limits.max_n:
        raise InvalidRequest(f"at most {limits.max_n} prompts per request", param="prompt")
    generation = await _build(
        wire,
        "completion",
        # A batch is counted as one text: its tokens are an estimate for an upstream anyway.
        "".join(prompts),
        codec,
        limits,
        wire.max_tokens,
        wire.logprobs,
        "logprobs",
        forwards=forwards,
    )
    if token_ids:
        generation = replace(generation, prompt_tokens=sum(len(ids) for ids in id_prompts))
    if len(prompts) == 1:
        return generation
    # The upstream answers n choices per prompt, indexed in order: the queue and the quota
    # count them all.
    choices = replace(generation.sampling, n=generation.sampling.n * len(prompts))
    return replace(generation, sampling=choices)


async def validate_embeddings(
    wire: EmbeddingsRequest, codec: PromptCodec, limits: Limits
) -> ValidatedRequest:
    """An embeddings request for an engine that forwards it (upstream, managed): bounded in
    its number of inputs and counted, so its quota reservation is its input tokens (the
    upstream's own count replaces the estimate when it answers). Nothing is generated."""
    if wire.input is None and wire.messages is None:
        raise InvalidRequest("input is required", param="input")
    texts: list[str] = []
    tokens = 0
    for item in embedding_inputs(wire, limits):
        if isinstance(item, str):
            texts.append(item)
        elif wire.messages is not None:  # a conversation
            texts += [_chat_message(m).content for m in cast(list[WireMessage], item)]
        else:  # token ids
            tokens += len(item or ())
    for text in texts:
        tokens += len(await _encode(codec, text, chat=False))
    return _forwarded(wire, "embeddings", tokens, SamplingOptions(max_tokens=0))


def embedding_inputs(wire: Any, limits: Limits) -> list[Any]:
    """The inputs of an embeddings request, llmserve's wire type or vLLM's (the same field
    names): texts or token-id lists (``input``), or conversations (``messages``, one or a
    batch), bounded in number and each conversation in length. Their token length is the
    model's to bound (its context, or ``truncate_prompt_tokens``)."""
    messages = getattr(wire, "messages", None)
    if messages is not None:
        batch = bool(messages) and isinstance(messages[0], list)
        items, param = (list(messages) if batch else [messages]), "messages"
        for conversation in items:
            check_message_count(len(conversation), limits)
    else:
        raw = wire.input
        items = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        param = "input"
    if len(items) > limits.max_embedding_inputs:
        raise InvalidRequest(
            f"at most {limits.max_embedding_inputs} inputs per embeddings request", param=param
        )
    return items


async def validate_responses(
    wire: ResponsesRequest, codec: PromptCodec, limits: Limits
) -> ValidatedRequest:
    """A Responses API request for an engine that forwards it, bounded as in process."""
    check_responses_limits(wire, limits)
    # Counted from the JSON of the input: an estimate, as for every upstream prompt.
    text = wire.input if isinstance(wire.input, str) else orjson.dumps(wire.input).decode()
    tokens = len(await _encode(codec, (wire.instructions or "") + text, chat=False))
    max_tokens = wire.max_output_tokens or limits.default_max_tokens
    sampling = SamplingOptions(max_tokens, requested_max_tokens=wire.max_output_tokens)
    return _forwarded(wire, "responses", tokens, sampling)


def check_responses_limits(wire: Any, limits: Limits) -> None:
    """llmserve's bounds on a Responses request, llmserve's own wire type or vLLM's (the same
    field names): output tokens, input items, top logprobs; no background runs."""
    if wire.max_output_tokens is not None and wire.max_output_tokens > limits.max_tokens:
        raise InvalidRequest(
            f"max_output_tokens must be at most {limits.max_tokens}", param="max_output_tokens"
        )
    if isinstance(wire.input, list) and len(wire.input) > limits.max_messages:
        raise InvalidRequest(
            f"at most {limits.max_messages} input items are allowed", param="input"
        )
    if getattr(wire, "background", False):
        raise InvalidRequest(
            "background responses are not served: llmserve answers each request while its "
            "client waits (deadline, abort on disconnect)",
            param="background",
        )
    top = getattr(wire, "top_logprobs", None)
    if top is not None and top > limits.max_logprobs:
        raise InvalidRequest(
            f"top_logprobs must be at most {limits.max_logprobs}", param="top_logprobs"
        )


def _forwarded(
    wire: EmbeddingsRequest | ResponsesRequest,
    kind: RequestKind,
    tokens: int,
    sampling: SamplingOptions,
) -> ValidatedRequest:
    """A request whose body an upstream takes whole; ``tokens`` is llmserve's estimate."""
    return ValidatedRequest(
        request_id=new_request_id(kind),
        model=wire.model,
        kind=kind,
        prompt="",
        prompt_token_ids=None,
        prompt_tokens=tokens,
        sampling=sampling,
        priority=wire.priority,
        session=wire.user,
        body=wire.model_dump(exclude_unset=True),
    )


async def validate_generate(
    wire: GenerateRequest, model: str, codec: PromptCodec, limits: Limits
) -> ValidatedRequest:
    sampling = SamplingFields(
        model=model,
        max_tokens=wire.max_tokens,
        temperature=wire.temperature,
        top_p=wire.top_p,
        seed=wire.seed,
        stop=wire.stop,
    )
    return await _build(sampling, "generate", wire.prompt, codec, limits, wire.max_tokens, None, "")


async def _build(
    wire: SamplingFields,
    kind: RequestKind,
    prompt: str,
    codec: PromptCodec,
    limits: Limits,
    max_tokens: int | None,
    logprobs: int | None,
    logprobs_param: str,
    messages: tuple[ChatMessage, ...] | None = None,
    forwards: bool = False,
) -> ValidatedRequest:
    if not forwards:
        _check_unsupported(wire)
    stop = _stop_sequences(wire.stop, limits)
    if wire.n > limits.max_n:
        raise InvalidRequest(f"n must be at most {limits.max_n}", param="n")
    if logprobs is not None and logprobs > limits.max_logprobs:
        raise InvalidRequest(
            f"{logprobs_param} must be at most {limits.max_logprobs}", param=logprobs_param
        )
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise InvalidRequest(f"max_tokens must be at most {limits.max_tokens}", param="max_tokens")
    token_ids = await _encode(codec, prompt, chat=kind == "chat")
    sampling = SamplingOptions(
        max_tokens=_fit_max_tokens(
            len(token_ids),
            max_tokens,
            codec.max_model_len,
            limits,
            prompt_param="messages" if kind == "chat" else "prompt",
        ),
        temperature=wire.temperature,
        top_p=wire.top_p,
        top_k=wire.top_k,
        stop=stop,
        seed=wire.seed,
        n=wire.n,
        presence_penalty=wire.presence_penalty,
        frequency_penalty=wire.frequency_penalty,
        logprobs=logprobs,
        ignore_eos=wire.ignore_eos,
        requested_max_tokens=max_tokens,
    )
    return ValidatedRequest(
        request_id=new_request_id(kind),
        model=wire.model,
        kind=kind,
        prompt=prompt,
        prompt_token_ids=tuple(token_ids) if codec.exact else None,
        prompt_tokens=len(token_ids),
        sampling=sampling,
        messages=messages,
        priority=wire.priority,
        session=wire.user,  # the session for affinity routing, unless a header names one
    )


def _chat_message(message: WireMessage) -> ChatMessage:
    content = message.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        # vLLM joins a message's text parts with newlines; the prompt must be the same.
        text = "\n".join(p.text for p in content if p.type == "text" and p.text is not None)
    role = "system" if message.role == "developer" else message.role
    return ChatMessage(role=role, content=text)


def _refuse_unmodelled(wire: ChatCompletionRequest | CompletionRequest) -> None:
    """A field llmserve's own engines would not honour is refused, never ignored."""
    found = next(_unmodelled(wire), None)
    if found is not None:
        param, what, code = found
        raise InvalidRequest(f"{what} is not served by this model", param=param, code=code)


def _unmodelled(wire: ChatCompletionRequest | CompletionRequest) -> Iterator[tuple[str, str, str]]:
    """(param, what, code) of each part of the body this schema does not model, in body
    order."""
    yield from _extras(wire, "")
    if wire.stream_options is not None:
        yield from _extras(wire.stream_options, "stream_options.")
    if not isinstance(wire, ChatCompletionRequest):
        return
    for i, message in enumerate(wire.messages):
        yield from _extras(message, f"messages.{i}.")
        parts = message.content if isinstance(message.content, list) else []
        for j, part in enumerate(parts):
            where = f"messages.{i}.content.{j}"
            if part.type != "text" or part.text is None:
                yield where, f"a content part of type '{part.type}'", "unsupported_content"
            yield from _extras(part, f"{where}.")


def _extras(model: BaseModel, where: str) -> Iterator[tuple[str, str, str]]:
    for name in model.model_extra or ():
        yield f"{where}{name[:64]}", f"the field '{name[:64]}'", "unknown_field"


def _check_unsupported(wire: SamplingFields) -> None:
    if wire.best_of is not None and wire.best_of != wire.n:
        raise InvalidRequest("best_of is not supported (use n)", param="best_of")
    if wire.logit_bias:
        raise InvalidRequest("logit_bias is not supported by this server", param="logit_bias")


def _stop_sequences(stop: str | list[str] | None, limits: Limits) -> tuple[str, ...]:
    if stop is None:
        return ()
    sequences = [stop] if isinstance(stop, str) else stop
    if len(sequences) > limits.max_stop_sequences:
        raise InvalidRequest(
            f"at most {limits.max_stop_sequences} stop sequences are allowed", param="stop"
        )
    for sequence in sequences:
        if not sequence:
            raise InvalidRequest("stop sequences must not be empty", param="stop")
        if len(sequence) > limits.max_stop_sequence_chars:
            raise InvalidRequest(
                f"each stop sequence must be at most {limits.max_stop_sequence_chars} characters",
                param="stop",
            )
    return tuple(sequences)


async def _encode(codec: PromptCodec, prompt: str, *, chat: bool) -> list[int]:
    # A rendered chat template already holds its special tokens.
    if len(prompt) <= _INLINE_TOKENIZE_CHARS:
        return codec.encode(prompt, not chat)
    return await asyncio.to_thread(codec.encode, prompt, not chat)


def _fit_max_tokens(
    prompt_tokens: int,
    requested: int | None,
    max_model_len: int | None,
    limits: Limits,
    prompt_param: str,
) -> int:
    """The request's max_tokens, or the default clipped to the room left in the context."""
    if max_model_len is None:
        return requested or limits.default_max_tokens
    room = max_model_len - prompt_tokens
    if room < 1:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens; the prompt has "
            f"{prompt_tokens} tokens, leaving no room to generate.",
            param=prompt_param,
        )
    if requested is None:
        return min(limits.default_max_tokens, room)
    if requested > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
            f"{requested} for the completion). Reduce the prompt or max_tokens.",
            param="max_tokens",
        )
    return requested
