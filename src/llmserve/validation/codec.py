"""What validation needs of an engine: its prompt rendering and token counts. Engines provide
it (``Engine.codec``); validation only uses it, so the Protocol lives here, below both."""

from __future__ import annotations

from typing import Protocol

from llmserve.validation.request import ChatMessage


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
