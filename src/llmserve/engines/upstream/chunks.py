"""Streamed chat and completion chunks of an OpenAI-compatible upstream, read as engine events;
the fields llmserve does not model are relayed as ``Passthrough``. Pure functions of the JSON
received. Anything not shaped as expected is an ``EngineFailure`` with code
``upstream_malformed``, never an internal error."""

from __future__ import annotations

from typing import Any

from llmserve.engines.events import (
    ChoiceFinished,
    EngineEvent,
    Passthrough,
    TextDelta,
    TokenLogprob,
    UsageReport,
)
from llmserve.engines.upstream.failures import redact
from llmserve.errors import EngineFailure, LLMServeError

# What llmserve itself reads of an upstream chunk; everything else is relayed (``Passthrough``).
_CHUNK_OWN = frozenset({"id", "object", "created", "model", "choices", "usage"})
_CHOICE_OWN = frozenset({"index", "delta", "text", "logprobs", "finish_reason"})
_DELTA_OWN = frozenset({"role", "content"})
_USAGE_OWN = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})


def chunk_events(chunk: Any, chat: bool, n: int, secret: str | None) -> list[EngineEvent]:
    """The events of one upstream chunk; anything not shaped like OpenAI's chunks is a
    malformed event (502 before the first token, in band after), never an internal error."""
    try:
        return _parse_chunk(chunk, chat, n, secret)
    except LLMServeError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise EngineFailure(
            f"the upstream engine sent a malformed event ({type(exc).__name__})",
            code="upstream_malformed",
        ) from exc


def _parse_chunk(chunk: Any, chat: bool, n: int, secret: str | None) -> list[EngineEvent]:
    if not isinstance(chunk, dict):
        raise EngineFailure("the upstream engine sent a malformed event", code="upstream_malformed")
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else str(error)
        message = redact(str(message), secret)
        raise EngineFailure(f"the upstream engine failed: {message}", code="upstream_error")
    events: list[EngineEvent] = []
    on_chunk = _extra(chunk, _CHUNK_OWN)
    for choice in chunk.get("choices") or ():
        index = int(choice.get("index", 0))
        if not 0 <= index < n:
            raise ValueError(f"choice index {index} outside 0..{n - 1}")
        delta = (choice.get("delta") or {}) if chat else {}
        text = delta.get("content") if chat else choice.get("text")
        raw_logprobs = choice.get("logprobs")
        reason = choice.get("finish_reason")
        # Nulls are dropped from token chunks (vLLM sends several on each), kept on the last.
        on_choice = _extra(choice, _CHOICE_OWN, keep_nulls=bool(reason))
        on_delta = _extra(delta, _DELTA_OWN) if chat else None
        # The token's own fields: on its text, even in the chunk that also finishes the choice.
        on_token = None if reason else on_choice
        count = 1
        if raw_logprobs:
            # Relayed as the upstream wrote them (nulls, bytes, offsets); parsed only to count.
            count = len(_parse_logprobs(raw_logprobs, chat)) or 1
            on_token = {**(on_token or {}), "logprobs": raw_logprobs}
        if text or on_delta or on_token:
            fields = None
            if on_delta or on_chunk or on_token:
                fields = Passthrough(on_delta, on_token, on_chunk)
                on_chunk = None  # once per chunk
            events.append(TextDelta(index, text or "", count, None, fields))
        if reason:
            fields = Passthrough(None, on_choice, on_chunk) if on_choice or on_chunk else None
            on_chunk = None
            events.append(ChoiceFinished(index, str(reason), fields))
    usage = chunk.get("usage")
    if usage:
        prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        if prompt < 0 or completion < 0:
            raise ValueError("negative token counts")
        events.append(UsageReport(prompt, completion, _extra(usage, _USAGE_OWN), on_chunk))
    return events


def _extra(
    part: dict[str, Any], own: frozenset[str], keep_nulls: bool = False
) -> dict[str, Any] | None:
    if own.issuperset(part):  # nearly every token's chunk: one pass in C, nothing built
        return None
    extra = {k: v for k, v in part.items() if k not in own and (keep_nulls or v is not None)}
    return extra or None


def _parse_logprobs(raw: Any, chat: bool) -> tuple[TokenLogprob, ...]:
    """A choice's logprobs, which the caller has seen are there (most chunks carry none)."""
    if chat:
        return tuple(
            TokenLogprob(
                item["token"],
                float(item["logprob"]),
                tuple((t["token"], float(t["logprob"])) for t in item.get("top_logprobs") or ()),
            )
            for item in raw.get("content") or ()
        )
    tops = raw.get("top_logprobs") or [None] * len(raw.get("tokens") or ())
    return tuple(
        TokenLogprob(token, float(lp or 0.0), tuple((top or {}).items()))
        for token, lp, top in zip(
            raw.get("tokens") or (), raw.get("token_logprobs") or (), tops, strict=False
        )
    )
