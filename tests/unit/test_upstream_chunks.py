"""Upstream chunks read as engine events, table by table: what llmserve reads, what it relays
untouched (``Passthrough``), and what it calls malformed (never an internal error)."""

from __future__ import annotations

from typing import Any

import pytest

from llmserve.engines.events import ChoiceFinished, EngineEvent, Passthrough, TextDelta, UsageReport
from llmserve.engines.upstream.chunks import chunk_events
from llmserve.errors import EngineFailure


def delta(content: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"index": 0, "delta": {"content": content, **extra}, "finish_reason": None}


CHAT: list[tuple[str, dict[str, Any], list[EngineEvent]]] = [
    ("one token", {"choices": [delta("Hi")]}, [TextDelta(0, "Hi", 1)]),
    ("a role-only first chunk", {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}, []),
    (
        "the last chunk finishes the choice",
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        [ChoiceFinished(0, "stop")],
    ),
    (
        "usage alone",
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
        [UsageReport(3, 2, None, None)],
    ),
    (
        "usage details are relayed",
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 3,
                "completion_tokens": 2,
                "total_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 1},
            },
        },
        [UsageReport(3, 2, {"prompt_tokens_details": {"cached_tokens": 1}}, None)],
    ),
    (
        "a delta field llmserve does not model (tool calls) is relayed on its token",
        {"choices": [delta(None, tool_calls=[{"index": 0, "id": "c1"}])]},
        [TextDelta(0, "", 1, None, Passthrough({"tool_calls": [{"index": 0, "id": "c1"}]}))],
    ),
    (
        "a chunk field is relayed once per chunk",
        {"system_fingerprint": "fp", "choices": [delta("a")]},
        [TextDelta(0, "a", 1, None, Passthrough(None, None, {"system_fingerprint": "fp"}))],
    ),
    (
        "nulls on token chunks are dropped",
        {"choices": [{**delta("a"), "stop_reason": None}]},
        [TextDelta(0, "a", 1)],
    ),
    (
        "a finishing choice keeps its nulls (vLLM's stop_reason)",
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": None}]},
        [ChoiceFinished(0, "stop", Passthrough(None, {"stop_reason": None}, None))],
    ),
]

COMPLETIONS: list[tuple[str, dict[str, Any], list[EngineEvent]]] = [
    (
        "text",
        {"choices": [{"index": 0, "text": "ab", "finish_reason": None}]},
        [TextDelta(0, "ab", 1)],
    ),
    (
        "text and the finish in one chunk",
        {"choices": [{"index": 1, "text": "z", "finish_reason": "length"}]},
        [TextDelta(1, "z", 1), ChoiceFinished(1, "length")],
    ),
]

MALFORMED: list[tuple[str, Any]] = [
    ("not an object", [1, 2]),
    ("a choice index past n", {"choices": [{"index": 5, "delta": {"content": "x"}}]}),
    ("a choice that is not an object", {"choices": ["x"]}),
    ("usage without its counts", {"choices": [], "usage": {"total_tokens": 1}}),
    ("negative counts", {"choices": [], "usage": {"prompt_tokens": -1, "completion_tokens": 0}}),
    ("a non-numeric index", {"choices": [{"index": "first", "delta": {}}]}),
]


@pytest.mark.parametrize(("what", "chunk", "events"), CHAT, ids=[c[0] for c in CHAT])
def test_chat_chunks(what: str, chunk: dict[str, Any], events: list[EngineEvent]) -> None:
    assert chunk_events(chunk, chat=True, n=2, secret=None) == events


@pytest.mark.parametrize(("what", "chunk", "events"), COMPLETIONS, ids=[c[0] for c in COMPLETIONS])
def test_completion_chunks(what: str, chunk: dict[str, Any], events: list[EngineEvent]) -> None:
    assert chunk_events(chunk, chat=False, n=2, secret=None) == events


@pytest.mark.parametrize(("what", "chunk"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_chunks_are_an_upstream_failure(what: str, chunk: Any) -> None:
    with pytest.raises(EngineFailure) as caught:
        chunk_events(chunk, chat=True, n=2, secret=None)
    assert caught.value.code == "upstream_malformed"


def test_an_in_band_upstream_error_is_named_and_its_key_redacted() -> None:
    chunk = {"error": {"message": "bad key sk-secret", "type": "server_error"}}
    with pytest.raises(EngineFailure) as caught:
        chunk_events(chunk, chat=True, n=1, secret="sk-secret")
    assert caught.value.code == "upstream_error"
    assert "sk-secret" not in caught.value.message and "[redacted]" in caught.value.message
