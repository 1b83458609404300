"""OpenAI wire format for responses: streaming chunks and whole responses, chat and completions."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from llmserve.engines.events import Passthrough, TokenLogprob, finished_tool_calls
from llmserve.serving.engine_request import Collected
from llmserve.validation.request import ValidatedRequest

_MARK = "\u0000llmserve-text\u0000"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ChunkFormatter:
    """Builds the ``data:`` payloads of one streaming response."""

    def __init__(self, request: ValidatedRequest, include_usage: bool) -> None:
        self._chat = request.kind == "chat"
        self._include_usage = include_usage
        # Completions logprobs carry each token's offset in the whole text, across chunks.
        self._offsets = [0] * request.sampling.n
        self._text_parts: dict[int, tuple[bytes, bytes]] = {}
        self._base = {
            "id": request.request_id,
            "object": "chat.completion.chunk" if self._chat else "text_completion",
            "created": int(time.time()),
            "model": request.model,
        }

    def text_frame(self, index: int, text: str) -> bytes:
        """The SSE frame of a plain text delta: a cached prefix and suffix around the JSON
        string, so the per-token hot path builds no dict."""
        parts = self._text_parts.get(index)
        if parts is None:
            template = orjson.dumps(self.text(index, _MARK, None))
            prefix, _, suffix = template.partition(orjson.dumps(_MARK))
            parts = self._text_parts[index] = (b"data: " + prefix, suffix + b"\n\n")
        return parts[0] + orjson.dumps(text) + parts[1]

    def _chunk(self, choice: dict[str, Any], fields: Passthrough | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {**self._base, "choices": [choice]}
        if self._include_usage:
            chunk["usage"] = None
        if fields is not None and fields.chunk:
            chunk.update(fields.chunk)
        return chunk

    def role(self, index: int) -> dict[str, Any]:
        """Chat streams open each choice with the assistant role, as OpenAI's do."""
        delta = {"role": "assistant", "content": ""}
        return self._chunk(
            {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        )

    def text(
        self,
        index: int,
        text: str,
        logprobs: Iterable[TokenLogprob] | None,
        fields: Passthrough | None = None,
    ) -> dict[str, Any]:
        if self._chat:
            formatted = chat_logprobs(logprobs) if logprobs is not None else None
            # A delta of only tool calls (or reasoning) has no content, as upstream sent it.
            delta: dict[str, Any] = {"content": text} if text or not fields else {}
            choice = {"index": index, "delta": delta, "logprobs": formatted, "finish_reason": None}
            return self._chunk(_with(choice, fields), fields)
        formatted = None
        if logprobs is not None:
            formatted = completion_logprobs(logprobs, self._offsets[index])
        self._offsets[index] += len(text)
        choice = {"index": index, "text": text, "logprobs": formatted, "finish_reason": None}
        return self._chunk(_with(choice, fields), fields)

    def finish(self, index: int, reason: str, fields: Passthrough | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": reason}
        if self._chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        return self._chunk(_with(choice, fields), fields)

    def usage(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        details: Mapping[str, Any] | None = None,
        chunk: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        counts: dict[str, Any] = usage(prompt_tokens, completion_tokens)
        if details:
            counts.update(details)
        return {**self._base, "choices": [], "usage": counts, **(chunk or {})}


def _with(choice: dict[str, Any], fields: Passthrough | None) -> dict[str, Any]:
    """A choice with an upstream's own fields added: those of its delta and its own."""
    if fields is not None:
        if fields.delta and "delta" in choice:
            choice["delta"].update(fields.delta)
        if fields.choice:
            choice.update(fields.choice)
    return choice


def full_response(request: ValidatedRequest, result: Collected) -> dict[str, Any]:
    if request.kind == "embeddings":
        return embeddings_response(request, result)
    if request.kind == "responses":  # the upstream's final response object, whole
        return {**result.extra, "model": request.model}
    chat = request.kind == "chat"
    choices = []
    for index, choice in enumerate(result.choices):
        text = "".join(choice.text)
        logprobs: Any = None
        if request.sampling.logprobs is not None:
            tokens = choice.logprobs
            logprobs = chat_logprobs(tokens) if chat else completion_logprobs(tokens, 0)
        entry: dict[str, Any] = {
            "index": index,
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
        }
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            message.update(choice.message)
            if "tool_calls" in message:
                message["tool_calls"] = finished_tool_calls(message["tool_calls"])
                if not text:
                    message["content"] = None  # OpenAI's: only tool calls, no text
            entry["message"] = message
        else:
            entry["text"] = text
        entry.update(choice.extra)
        choices.append(entry)
    counts: dict[str, Any] = usage(result.prompt_tokens, result.completion_tokens)
    counts.update(result.usage_details)
    return {
        "id": request.request_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": choices,
        "usage": counts,
        **result.extra,
    }


def embeddings_response(request: ValidatedRequest, result: Collected) -> dict[str, Any]:
    """An upstream's embeddings answer, relayed whole under llmserve's id and model name."""
    counts: dict[str, Any] = {
        "prompt_tokens": result.prompt_tokens,
        "total_tokens": result.prompt_tokens,
    }
    counts.update(result.usage_details)
    response: dict[str, Any] = {
        "id": request.request_id,
        "object": "list",
        "created": int(time.time()),
        "model": request.model,
    }
    response.update(result.extra)
    response["usage"] = counts
    return response


def chat_logprobs(tokens: Iterable[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.token.encode()),
                "top_logprobs": [
                    {"token": alt, "logprob": lp, "bytes": list(alt.encode())} for alt, lp in t.top
                ],
            }
            for t in tokens
        ]
    }


def completion_logprobs(tokens: Iterable[TokenLogprob], offset: int) -> dict[str, Any]:
    listed = list(tokens)
    offsets = []
    for t in listed:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in listed],
        "token_logprobs": [t.logprob for t in listed],
        "top_logprobs": [dict(t.top) for t in listed],
        "text_offset": offsets,
    }
