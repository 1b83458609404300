"""What an engine yields while it generates: narrow event types, treated as immutable values."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def finish_reason(engine_reason: str) -> str:
    """OpenAI's two reasons from an engine's: only running out of max_tokens is "length".
    (An upstream's own reason, ``tool_calls`` say, is relayed as it came.)"""
    return "length" if engine_reason == "length" else "stop"


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Fields of an upstream's chunk that llmserve does not model, relayed as they came: of the
    chat delta (``tool_calls``, ``reasoning_content``, ``refusal``, ...), of the choice
    (``stop_reason``, ``token_ids``, ``prompt_logprobs``, ...) and of the chunk itself
    (``prompt_token_ids``, ``system_fingerprint``, ...). None on plain text tokens."""

    delta: Mapping[str, Any] | None = None
    choice: Mapping[str, Any] | None = None
    chunk: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    # The most likely alternatives at this position, most likely first.
    top: tuple[tuple[str, float], ...] = ()


# Not frozen, though nothing changes one: a frozen dataclass's __init__ sets each field through
# object.__setattr__, which makes it 3-4x slower to build (0.9 against 0.25 us), and one is
# built per streamed token.
@dataclass(slots=True)
class TextDelta:
    """New text for one choice, and how many tokens it took."""

    index: int
    text: str
    num_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None
    fields: Passthrough | None = None


@dataclass(frozen=True, slots=True)
class ChoiceFinished:
    index: int
    reason: str
    fields: Passthrough | None = None


@dataclass(frozen=True, slots=True)
class UsageReport:
    """Token counts as the engine saw them; sent once, after the last choice finished."""

    prompt_tokens: int
    completion_tokens: int
    # Usage fields beyond the counts (prompt_tokens_details, ...), as an upstream sent them,
    # and the fields of the chunk that carried them (vLLM's system_fingerprint, ...).
    details: Mapping[str, Any] | None = None
    chunk: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RawFrame:
    """One event of an upstream stream that is relayed as it came, not rebuilt from parts (the
    Responses API's named events: ``response.created``, ``response.output_text.delta``, ...),
    and how many generated tokens it carries (for metrics; the usage report settles counts)."""

    type: str
    data: Mapping[str, Any]
    tokens: int = 0


EngineEvent = TextDelta | ChoiceFinished | UsageReport | RawFrame


def merge_fields(into: dict[str, Any], fields: Mapping[str, Any]) -> None:
    """Add one chunk's passthrough fields to the whole response's, as OpenAI's SDK accumulates
    a stream (``openai.lib.streaming._deltas.accumulate_delta``): text concatenated, objects
    merged key by key, lists of indexed objects (streamed tool calls) merged by ``index``,
    other lists (logprobs, token ids) extended; ``index``, ``type`` and numbers are replaced,
    not summed (a ``stop_reason`` is a token id), and a null never overwrites a value."""
    for key, value in fields.items():
        held = into.get(key)
        if held is None or key in ("index", "type"):
            if value is not None or key not in into:
                into[key] = _fresh(value)
        elif isinstance(held, str) and isinstance(value, str):
            into[key] = held + value
        elif isinstance(held, dict) and isinstance(value, dict):
            merge_fields(held, value)
        elif isinstance(held, list) and isinstance(value, list):
            _merge_list(held, value)
        elif value is not None:
            into[key] = _fresh(value)


def _merge_list(held: list[Any], items: list[Any]) -> None:
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("index"), int):
            same = next(
                (h for h in held if isinstance(h, dict) and h.get("index") == item["index"]),
                None,
            )
            if same is not None:
                merge_fields(same, item)
                continue
        held.append(_fresh(item))


def _fresh(value: Any) -> Any:
    """A copy of what will be merged into, so a chunk's own objects are never changed."""
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fresh(v) for v in value]
    return value


def finished_tool_calls(calls: list[Any]) -> list[Any]:
    """A whole response's tool calls carry no stream ``index``."""
    return [
        {k: v for k, v in c.items() if k != "index"} if isinstance(c, dict) else c for c in calls
    ]
