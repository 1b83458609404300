"""The engine interface: generate → async iterator of events, abort, health, close."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol, runtime_checkable

from llmserve.engines.events import EngineEvent
from llmserve.validation.request import ChatMessage, GenerationRequest


class PromptCodec(Protocol):
    """Turns what a client sent into the prompt an engine sees, and counts its tokens."""

    @property
    def max_model_len(self) -> int | None:
        """Context length in tokens, or None where it is not known (the engine then decides)."""

    @property
    def exact(self) -> bool:
        """True when ``encode`` is the engine's own tokenizer, not an estimate."""

    def render_chat(self, messages: tuple[ChatMessage, ...]) -> str: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; chat prompts are rendered with their special tokens, so pass False."""


@runtime_checkable
class Engine(Protocol):
    """One model's inference engine."""

    @property
    def codec(self) -> PromptCodec: ...

    async def start(self) -> None:
        """Load or connect; returns once the engine can take requests."""

    def generate(self, request: GenerationRequest) -> AsyncGenerator[EngineEvent, None]:
        """Stream events for one request. Closing the iterator early must abort the work."""

    async def abort(self, request_id: str) -> None:
        """Stop a request's work; a no-op for one that is unknown or already finished."""

    async def check_health(self) -> bool: ...

    async def close(self) -> None: ...
