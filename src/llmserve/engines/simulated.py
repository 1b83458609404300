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
from llmserve.validation.request import ChatMessage, ValidatedRequest

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
        self.started: set[str] = set()
        self._stopping: set[str] = set()
        self.aborted: list[str] = []
        self.completed: list[str] = []
        self._healthy = True

    @property
    def codec(self) -> WordCodec:
        return self._codec

    async def start(self) -> None:
        self._healthy = True

    async def generate(self, request: ValidatedRequest) -> AsyncGenerator[EngineEvent, None]:
        self.active.add(request.request_id)
        self.started.add(request.request_id)
        try:
            async for event in self._run(request):
                yield event
            if request.request_id not in self._stopping:
                self.completed.append(request.request_id)
        finally:
            self.active.discard(request.request_id)
            self._stopping.discard(request.request_id)

    async def _run(self, request: ValidatedRequest) -> AsyncGenerator[EngineEvent, None]:
        sampling = request.sampling
        scanners = [StopScanner(sampling.stop) for _ in range(sampling.n)]
        finished = [False] * sampling.n
        emitted = 0
        offset = (sampling.seed or 0) % len(_WORDS)
        await asyncio.sleep(self._config.first_token_latency_s)
        for step in range(sampling.max_tokens):
            if step:
                await asyncio.sleep(self._interval)
            if request.request_id in self._stopping:
                return  # aborted while the consumer was not looking (a deadline, say)
            for index in range(sampling.n):
                if finished[index]:
                    continue
                word = _WORDS[(offset + step + index) % len(_WORDS)]
                text, stopped = scanners[index].feed(word)
                emitted += 1
                last = stopped or step == sampling.max_tokens - 1
                if last and not stopped:
                    text += scanners[index].flush()
                if text:
                    yield TextDelta(index, text, 1, _logprobs(word, sampling.logprobs))
                if last:
                    finished[index] = True
                    yield ChoiceFinished(index, "stop" if stopped else "length")
            if all(finished):
                break
        yield UsageReport(request.prompt_tokens, emitted)

    async def abort(self, request_id: str) -> None:
        # Recorded for any request that started and did not complete, even if its generator
        # was already closed by the cancellation that caused the abort.
        if request_id in self.started and request_id not in self.completed:
            self.aborted.append(request_id)
            if request_id in self.active:
                self._stopping.add(request_id)

    async def check_health(self) -> bool:
        return self._healthy

    async def close(self) -> None:
        self._healthy = False


class StopScanner:
    """Stop sequences as vLLM applies them: the text ends before the earliest match, and text
    that may be the start of a stop sequence is held back until it is known not to be."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._text = ""
        self._sent = 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add generated text; return what may be sent now, and whether a stop matched."""
        start = max(0, self._sent - max((len(s) for s in self._stops), default=0))
        self._text += piece
        matches = [at for s in self._stops if (at := self._text.find(s, start)) != -1]
        if matches:
            out = self._text[self._sent : max(min(matches), self._sent)]
            self._sent = len(self._text)
            return out, True
        safe = len(self._text) - self._held_back()
        out = self._text[self._sent : max(safe, self._sent)]
        self._sent = max(safe, self._sent)
        return out, False

    def flush(self) -> str:
        """The held-back text, once the choice ends for another reason."""
        out = self._text[self._sent :]
        self._sent = len(self._text)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


def _logprobs(word: str, top: int | None) -> tuple[TokenLogprob, ...] | None:
    if top is None:
        return None
    alternatives = tuple((w, -1.0 - i) for i, w in enumerate(_WORDS[:top]))
    return (TokenLogprob(word, -0.5, alternatives),)
