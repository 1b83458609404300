"""The OpenAI wire schema (requests). Static bounds live here; configurable ones in validation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_SEED_MIN = -(2**63)
_SEED_MAX = 2**64 - 1


class _Wire(BaseModel):
    # Fields this schema does not name are kept (``model_extra``), never ignored: an engine
    # that forwards the body (upstream) passes them on, the others refuse them with a 400
    # naming the field (``validation.validate``).
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Wire):
    include_usage: bool = False


class ContentPart(_Wire):
    """One part of a message's content: text here; images, audio, files for the engines that
    take them (their fields are extras)."""

    type: str = Field(max_length=64)
    text: str | None = None


class WireMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=256)


class SamplingFields(_Wire):
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    # vLLM extension: -1 (or 0) means no top-k cut.
    top_k: int | None = Field(default=None, ge=-1, le=100_000)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=_SEED_MIN, le=_SEED_MAX)
    n: int = Field(default=1, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    # Accepted only at their harmless values; see validation for the error otherwise.
    best_of: int | None = Field(default=None, ge=1)
    logit_bias: dict[str, float] | None = None
    # vLLM extension: generate max_tokens even past end-of-sequence (benchmarks use it).
    ignore_eos: bool = False
    # vLLM extension: scheduling class, lower first; it can only lower the key's own urgency.
    priority: int = Field(default=0, ge=-1000, le=1000)


class ChatCompletionRequest(SamplingFields):
    messages: list[WireMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    tools: list[dict[str, object]] | None = None


class CompletionRequest(SamplingFields):
    # Text, texts, or token ids (one prompt or several): ids only for engines that forward.
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    suffix: str | None = None


class EmbeddingsRequest(_Wire):
    """What llmserve reads of an embeddings request to an engine that forwards it: the model,
    and the inputs it counts for the quota (texts, token ids, or vLLM's chat ``messages``)."""

    model: str = Field(max_length=256)
    input: str | list[str] | list[int] | list[list[int]] | None = None
    messages: list[WireMessage] | list[list[WireMessage]] | None = None
    user: str | None = Field(default=None, max_length=256)
    priority: int = Field(default=0, ge=-1000, le=1000)


class ResponsesRequest(_Wire):
    """What llmserve reads of a Responses API request to an engine that forwards it: the model,
    what it counts (input, instructions) and bounds; every other field travels as sent."""

    model: str = Field(max_length=256)
    input: str | list[dict[str, object]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    top_logprobs: int | None = Field(default=None, ge=0)
    background: bool | None = None
    stream: bool = False
    user: str | None = Field(default=None, max_length=256)
    priority: int = Field(default=0, ge=-1000, le=1000)


class GenerateRequest(BaseModel):
    """The simple streaming endpoint of the original design: prompt in, one event per token out."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    max_tokens: int | None = Field(default=None, ge=1)
    model: str | None = Field(default=None, max_length=256)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=_SEED_MIN, le=_SEED_MAX)
    stop: str | list[str] | None = None
