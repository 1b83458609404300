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
    # Usage fields beyond the counts (prompt_tokens_details, ...), as an upstream sent them.
    details: Mapping[str, Any] | None = None


EngineEvent = TextDelta | ChoiceFinished | UsageReport


def merge_fields(into: dict[str, Any], fields: Mapping[str, Any]) -> None:
    """Add one chunk's passthrough fields to the whole response's, as OpenAI's SDKs accumulate
    a stream: text is concatenated, lists (token ids) extended, streamed tool calls joined by
    their ``index`` (arguments arrive in pieces), anything else replaced by the latest value."""
    for key, value in fields.items():
        held = into.get(key)
        if key == "tool_calls" and isinstance(value, list):
            into[key] = _merge_tool_calls(held if isinstance(held, list) else [], value)
        elif isinstance(value, str) and isinstance(held, str):
            into[key] = held + value
        elif isinstance(value, list):
            into[key] = (held if isinstance(held, list) else []) + value
        elif value is not None or key not in into:
            into[key] = value


def _merge_tool_calls(calls: list[Any], deltas: list[Any]) -> list[Any]:
    for delta in deltas:
        if not isinstance(delta, dict):
            calls.append(delta)
            continue
        index = delta.get("index", len(calls))
        call = next((c for c in calls if isinstance(c, dict) and c.get("index") == index), None)
        if call is None:
            calls.append({**delta, "index": index, "function": dict(delta.get("function") or {})})
            continue
        for key, value in delta.items():
            if key == "function" and isinstance(value, dict):
                function = call.setdefault("function", {})
                for name, part in value.items():
                    held = function.get(name)
                    if isinstance(part, str) and isinstance(held, str):
                        function[name] = held + part
                    elif part is not None:
                        function[name] = part
            elif value is not None and key != "index":
                call[key] = value
    return calls


def finished_tool_calls(calls: list[Any]) -> list[Any]:
    """A whole response's tool calls carry no stream ``index``."""
    return [
        {k: v for k, v in c.items() if k != "index"} if isinstance(c, dict) else c for c in calls
    ]
