"""The tests' own SSE reader follows the WHATWG event-stream rules, chunk boundaries included."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from tests.support.sse import Comment, Decoder, Event, aiter_sse, parse

CASES: list[tuple[str, bytes, list[Event | Comment]]] = [
    ("one event", b"data: x\n\n", [Event("x")]),
    ("multi-line data joined", b"data: a\ndata: b\n\n", [Event("a\nb")]),
    ("CRLF", b"data: a\r\ndata: b\r\n\r\n", [Event("a\nb")]),
    ("lone CR", b"data: a\rdata: b\r\r", [Event("a\nb")]),
    ("no space after colon", b"data:x\n\n", [Event("x")]),
    ("only one space stripped", b"data:  x\n\n", [Event(" x")]),
    ("empty data line", b"data\n\n", [Event("")]),
    ("comment", b": keep-alive\n\n", [Comment(" keep-alive")]),
    ("comment inside an event", b"data: a\n:ping\ndata: b\n\n", [Comment("ping"), Event("a\nb")]),
    ("event name", b"event: end\ndata: {}\n\n", [Event("{}", "end")]),
    ("event name resets", b"event: end\ndata: 1\n\ndata: 2\n\n", [Event("1", "end"), Event("2")]),
    ("id persists", b"id: 7\ndata: 1\n\ndata: 2\n\n", [Event("1", id="7"), Event("2", id="7")]),
    ("id with NUL ignored", b"id: a\0b\ndata: 1\n\n", [Event("1")]),
    ("no data, no event", b"event: x\n\n", []),
    ("unknown fields ignored", b"retry: 10\nfoo: bar\ndata: 1\n\n", [Event("1")]),
    ("colon in value kept", b"data: a: b\n\n", [Event("a: b")]),
    ("trailing event without blank line dropped", b"data: 1\n\ndata: 2\n", [Event("1")]),
    ("unterminated last line dropped", b"data: 1\n\ndata: 2", [Event("1")]),
    ("BOM stripped", b"\xef\xbb\xbfdata: 1\n\n", [Event("1")]),
    ("utf-8", "data: é 🦊\n\n".encode(), [Event("é 🦊")]),
]


@pytest.mark.parametrize(("stream", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_whole_stream(stream: bytes, expected: list[Event | Comment]) -> None:
    assert parse(stream) == expected


@pytest.mark.parametrize(("stream", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_byte_by_byte(stream: bytes, expected: list[Event | Comment]) -> None:
    decoder = Decoder()
    items = [item for i in range(len(stream)) for item in decoder.feed(stream[i : i + 1])]
    assert items + decoder.close() == expected


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    decoder = Decoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n\r") == []
    assert decoder.feed(b"\n") == [Event("a")]


def test_pending_says_the_stream_ended_inside_an_event() -> None:
    decoder = Decoder()
    decoder.feed(b"data: 1\n\ndata: 2\n")
    decoder.close()
    assert decoder.pending


def test_done_and_json() -> None:
    first, done = parse(b'data: {"a": 1}\n\ndata: [DONE]\n\n')
    assert isinstance(first, Event) and isinstance(done, Event)
    assert not first.done and first.json() == {"a": 1}
    assert done.done


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_async_reader_and_complete() -> None:
    items = [item async for item in aiter_sse(_chunks(b"data: 1\n", b"\n: ka\n"))]
    assert items == [Event("1"), Comment(" ka")]
    with pytest.raises(AssertionError, match="inside an event"):
        _ = [item async for item in aiter_sse(_chunks(b"data: 1\n"), complete=True)]
