"""Engine events → SSE frames, one encoder per wire protocol."""

from __future__ import annotations

from typing import Protocol

from llmserve.engines.events import ChoiceFinished, EngineEvent, RawFrame, TextDelta
from llmserve.errors import LLMServeError
from llmserve.streaming import sse
from llmserve.streaming.openai_format import ChunkFormatter
from llmserve.validation.request import ValidatedRequest
from llmserve.wire.errors import body_for

# A tuple, not ``TextDelta | ChoiceFinished``: that union would be built on every token.
_CHOICE_EVENTS = (TextDelta, ChoiceFinished)


class StreamEncoder(Protocol):
    def encode(self, event: EngineEvent) -> list[bytes]: ...

    def end(self) -> list[bytes]:
        """Frames after the last event of a stream that completed."""

    def error(self, exc: LLMServeError) -> list[bytes]:
        """Frames that end a stream that failed after it started."""


class OpenAIStreamEncoder:
    """Chat or completion chunks, ``data: [DONE]`` at the end, errors in-band as OpenAI does."""

    def __init__(self, request: ValidatedRequest, include_usage: bool) -> None:
        self._formatter = ChunkFormatter(request, include_usage)
        self._include_usage = include_usage
        self._chat = request.kind == "chat"
        self._opened: set[int] = set()

    def encode(self, event: EngineEvent) -> list[bytes]:
        if not isinstance(event, _CHOICE_EVENTS):
            if isinstance(event, RawFrame) or not self._include_usage:  # no raw frames here
                return []
            usage = self._formatter.usage(
                event.prompt_tokens, event.completion_tokens, event.details, event.chunk
            )
            return [sse.data(usage)]
        frames = []
        if self._chat and event.index not in self._opened:
            self._opened.add(event.index)
            frames.append(sse.data(self._formatter.role(event.index)))
        if isinstance(event, TextDelta):
            if event.logprobs is None and event.fields is None:
                frames.append(self._formatter.text_frame(event.index, event.text))
            else:
                chunk = self._formatter.text(event.index, event.text, event.logprobs, event.fields)
                frames.append(sse.data(chunk))
        else:
            chunk = self._formatter.finish(event.index, event.reason, event.fields)
            frames.append(sse.data(chunk))
        return frames

    def end(self) -> list[bytes]:
        return [sse.DONE]

    def error(self, exc: LLMServeError) -> list[bytes]:
        return [sse.data(body_for(exc)), sse.DONE]


class ResponsesStreamEncoder:
    """The Responses API's named events, relayed as the upstream sent them (ids included, so
    ``previous_response_id`` still finds them there), under the model name the client used;
    errors after the start as ``event: error``, as vLLM's own stream ends."""

    def __init__(self, request: ValidatedRequest) -> None:
        self._model = request.model

    def encode(self, event: EngineEvent) -> list[bytes]:
        if not isinstance(event, RawFrame):
            return []  # the usage report: the terminal event itself carries the usage
        data = event.data
        response = data.get("response")
        if isinstance(response, dict) and "model" in response:
            data = {**data, "response": {**response, "model": self._model}}
        return [sse.event(event.type, data)]

    def end(self) -> list[bytes]:
        return []

    def error(self, exc: LLMServeError) -> list[bytes]:
        return [sse.event("error", body_for(exc))]


class GenerateStreamEncoder:
    """The ``/generate`` protocol: ``data: {"token": ...}`` per delta, then ``event: end``."""

    def __init__(self) -> None:
        self._finish_reason: str | None = None

    def encode(self, event: EngineEvent) -> list[bytes]:
        if isinstance(event, TextDelta):
            return [sse.data({"token": event.text})] if event.text else []
        if isinstance(event, ChoiceFinished):
            self._finish_reason = event.reason
            return []
        if isinstance(event, RawFrame):
            return []
        usage = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}
        return [sse.event("end", {"finish_reason": self._finish_reason, "usage": usage})]

    def end(self) -> list[bytes]:
        return []

    def error(self, exc: LLMServeError) -> list[bytes]:
        return [sse.event("error", body_for(exc))]
