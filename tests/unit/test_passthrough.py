"""How an upstream's own fields add up over a stream into one whole response."""

from __future__ import annotations

from typing import Any

from llmserve.engines.events import finished_tool_calls, merge_fields


def test_text_lists_and_tool_call_pieces_accumulate_as_the_sdk_does() -> None:
    message: dict[str, Any] = {}
    call = {"index": 0, "id": "c0", "type": "function", "function": {"name": "f", "arguments": ""}}
    second = {"index": 1, "id": "c1", "type": "function", "function": {"name": "g"}}
    for piece in (
        {"reasoning_content": "thin", "tool_calls": [call]},
        {
            "reasoning_content": "king",
            "tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}],
        },
        {"tool_calls": [second, {"index": 0, "function": {"arguments": ": 1}"}}]},
        {"token_ids": [1, 2]},
        {"token_ids": [3], "stop_reason": None},
        {"stop_reason": 7},
    ):
        merge_fields(message, piece)
    assert message["reasoning_content"] == "thinking"
    assert message["token_ids"] == [1, 2, 3]
    assert message["stop_reason"] == 7  # the latest value that is not null
    assert finished_tool_calls(message["tool_calls"]) == [
        {"id": "c0", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "c1", "type": "function", "function": {"name": "g"}},
    ]
    # The first delta's own dict is not changed by later pieces.
    assert call["function"] == {"name": "f", "arguments": ""}


def test_a_null_field_is_kept_when_it_is_all_there_is() -> None:
    choice: dict[str, Any] = {}
    merge_fields(choice, {"stop_reason": None})
    assert choice == {"stop_reason": None}
