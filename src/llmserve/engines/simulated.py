"""The simulated engine: a deterministic TEST AND BENCHMARK DOUBLE, not a model.

It emits a fixed word cycle at a configured token rate after a configured first-token latency, so
the gateway can be tested and benchmarked at GPU-scale token rates on a CPU machine. It records
which requests were aborted, so tests can prove that a client disconnect reaches the engine.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import AsyncGenerator

from llmserve.config import SimulatedModel
from llmserve.engines.events import (
    ChoiceFinished,
    EngineEvent,
    TextDelta,
    TokenLogprob,
    UsageReport,
)
from llmserve.validation.request import ChatMessage, GenerationRequest

_WORDS = (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ".")
_TOKEN_RE = re.compile(r"\s*\S+|\s+")


class WordCodec:
    """Whitespace-word tokeniser with a plain chat template: exact for the simulated engine."""

    def __init__(self, max_model_len: int) -> None:
        self._max_model_len = max_model_len

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def exact(self) -> bool:
        return True

    def render_chat(self, messages: tuple[ChatMessage, ...]) -> str:
        turns = "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages)
        return turns + "<|assistant|>\n"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [zlib.crc32(piece.encode()) & 0xFFFF for piece in _TOKEN_RE.findall(text)]


class SimulatedEngine:
    """Deterministic token stream at ``tokens_per_second`` per request (all choices together)."""

    def __init__(self, config: SimulatedModel) -> None:
        self._config = config
        self._codec = WordCodec(config.max_model_len)
        self._interval = 1.0 / config.tokens_per_second
        self.active: set[str] = set()
        self.aborted: list[str] = []
        self.completed: list[str] = []
        self._healthy = True

    @property
    def codec(self) -> WordCodec:
        return self._codec

    async def start(self) -> None:
        self._healthy = True

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[EngineEvent, None]:
        self.active.add(request.request_id)
        try:
            async for event in self._run(request):
                yield event
            self.completed.append(request.request_id)
        finally:
            self.active.discard(request.request_id)

    async def _run(self, request: GenerationRequest) -> AsyncGenerator[EngineEvent, None]:
        sampling = request.sampling
        texts = [""] * sampling.n
        finished = [False] * sampling.n
        emitted = 0
        offset = (sampling.seed or 0) % len(_WORDS)
        await asyncio.sleep(self._config.first_token_latency_s)
        for step in range(sampling.max_tokens):
            if step:
                await asyncio.sleep(self._interval)
            for index in range(sampling.n):
                if finished[index]:
                    continue
                word = _WORDS[(offset + step + index) % len(_WORDS)]
                text, stopped = _cut_at_stop(texts[index], word, sampling.stop)
                texts[index] += text
                emitted += 1
                if text or not stopped:
                    yield TextDelta(index, text, 1, _logprobs(word, sampling.logprobs))
                if stopped or step == sampling.max_tokens - 1:
                    finished[index] = True
                    yield ChoiceFinished(index, "stop" if stopped else "length")
            if all(finished):
                break
        yield UsageReport(request.prompt_tokens, emitted)

    async def abort(self, request_id: str) -> None:
        if request_id in self.active:
            self.aborted.append(request_id)

    async def check_health(self) -> bool:
        return self._healthy

    async def close(self) -> None:
        self._healthy = False


def _cut_at_stop(so_far: str, word: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The part of ``word`` to emit, and whether a stop sequence ended the choice."""
    joined = so_far + word
    for stop in stops:
        at = joined.find(stop, max(0, len(so_far) - len(stop) + 1))
        if at != -1:
            return joined[len(so_far) : at] if at >= len(so_far) else "", True
    return word, False


def _logprobs(word: str, top: int | None) -> tuple[TokenLogprob, ...] | None:
    if top is None:
        return None
    alternatives = tuple((w, -1.0 - i) for i, w in enumerate(_WORDS[:top]))
    return (TokenLogprob(word, -0.5, alternatives),)
