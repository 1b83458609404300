"""The narrow, validated request type that every stage after validation works with."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

RequestKind = Literal["chat", "completion", "generate", "responses", "embeddings"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Number of most likely alternatives to report per token; None means no logprobs at all.
    logprobs: int | None = None
    ignore_eos: bool = False
    # What the client asked for (max_tokens is that or the default clipped to the context).
    requested_max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class ValidatedRequest:
    """A request that passed validation: prompt rendered and counted, every option bounded."""

    request_id: str
    model: str
    kind: RequestKind
    prompt: str
    # The engine tokenizer's ids when the codec is exact, so the engine need not tokenise again.
    prompt_token_ids: tuple[int, ...] | None
    prompt_tokens: int
    sampling: SamplingOptions
    # Chat requests keep their messages so an upstream engine can apply its own template.
    messages: tuple[ChatMessage, ...] | None = None
    # Scheduling class, lower first (admission, and vLLM's priority scheduling where enabled).
    priority: int = 0
    # W3C trace context to pass to an upstream engine (traceparent, tracestate).
    trace_headers: tuple[tuple[str, str], ...] = ()
    # Requests of one session go to the same replica under session affinity routing.
    session: str | None = None
    # The client's body as sent (the model's own name in "model"), for an engine that forwards
    # it whole (upstream and managed ``vllm serve``): every field keeps the upstream's meaning.
    body: Mapping[str, Any] | None = None
