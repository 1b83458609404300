"""Token counts for a model whose tokenizer is not here: estimated from bytes."""

from __future__ import annotations

import math

from llmserve.validation.request import ChatMessage

# Without the upstream's tokenizer we estimate: about four bytes of UTF-8 per token for English.
_BYTES_PER_TOKEN = 4


class EstimatingCodec:
    """Token counts estimated from bytes; the upstream applies its own template and limits."""

    @property
    def max_model_len(self) -> int | None:
        # An estimate must not reject a prompt the upstream would take: let the upstream decide.
        return None

    @property
    def exact(self) -> bool:
        return False

    def render_chat(self, messages: tuple[ChatMessage, ...]) -> str:
        return "\n".join(f"{m.role}: {m.content}" for m in messages)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [0] * math.ceil(len(text.encode()) / _BYTES_PER_TOKEN)
