"""One server-sent-events reader for every test, following the WHATWG event-stream rules.

Hand-written rather than ``httpx-sse``: that library drops comments, and the tests count comments
as keep-alives; it also gives no arrival time per event, which the latency tests need. The
parsing rules fit in one small class that is tested on its own (tests/unit/test_support_sse.py).
"""

from __future__ import annotations

import codecs
import json
import re
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

DONE = "[DONE]"
_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Event:
    """One dispatched event: its ``data`` lines joined with ``\\n``, stamped when it completed."""

    data: str
    event: str = "message"
    id: str = ""
    at: float = field(default=0.0, compare=False)  # time.monotonic() of its dispatching line

    @property
    def done(self) -> bool:
        """The OpenAI end-of-stream sentinel ``data: [DONE]``."""
        return self.data == DONE

    def json(self) -> Any:
        """The data parsed as JSON (never call it on ``[DONE]``)."""
        assert not self.done, "data: [DONE] is not JSON"
        return json.loads(self.data)


@dataclass(frozen=True)
class Comment:
    """A line starting with ``:``; gateways send these as keep-alives."""

    text: str
    at: float = field(default=0.0, compare=False)


class Decoder:
    """Incremental parser: feed it bytes as they arrive, get back what they completed."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._started = False
        self._data: list[str] = []
        self._event = ""
        self._last_id = ""  # the spec's "last event ID" persists across events
        self.pending = False  # a field line arrived since the last dispatch

    def feed(self, chunk: bytes, *, final: bool = False) -> list[Event | Comment]:
        text = self._utf8.decode(chunk, final=final)
        if not self._started and text:
            text, self._started = text.removeprefix("\ufeff"), True
        text, hold = self._buffer + text, ""
        if not final and text.endswith("\r"):
            text, hold = text[:-1], "\r"  # maybe the first half of a CRLF split across chunks
        lines = _LINE_END.split(text)
        self._buffer = lines.pop() + hold
        at = time.monotonic()
        out = [item for line in lines if (item := self._line(line, at)) is not None]
        if final and self._buffer:
            # An unterminated last line is discarded, as the spec says, but remembered.
            self.pending = self.pending or not self._buffer.startswith(":")
            self._buffer = ""
        return out

    def close(self) -> list[Event | Comment]:
        """End of stream; an event without its blank line is discarded (``pending`` stays set)."""
        return self.feed(b"", final=True)

    def _line(self, line: str, at: float) -> Event | Comment | None:
        if line == "":
            return self._dispatch(at)
        if line.startswith(":"):
            return Comment(line[1:], at)
        self.pending = True
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        return None  # "retry" and unknown fields are ignored

    def _dispatch(self, at: float) -> Event | None:
        data, name = self._data, self._event
        self._data, self._event, self.pending = [], "", False
        if not data:
            return None
        return Event("\n".join(data), name or "message", self._last_id, at)


async def aiter_sse(
    source: httpx.Response | AsyncIterable[bytes], *, complete: bool = False
) -> AsyncIterator[Event | Comment]:
    """Events and comments in arrival order. With ``complete``, fail if the stream ends inside
    an event (a spec reader would silently drop it)."""
    chunks = source.aiter_bytes() if isinstance(source, httpx.Response) else source
    decoder = Decoder()
    async for chunk in chunks:
        for item in decoder.feed(chunk):
            yield item
    for item in decoder.close():
        yield item
    assert not (complete and decoder.pending), "the stream ended inside an event"


async def aiter_events(
    source: httpx.Response | AsyncIterable[bytes], *, complete: bool = False
) -> AsyncIterator[Event]:
    """As :func:`aiter_sse`, comments left out."""
    async for item in aiter_sse(source, complete=complete):
        if isinstance(item, Event):
            yield item


def parse(stream: bytes) -> list[Event | Comment]:
    """A whole stream at once, for streams already read and for testing the rules."""
    decoder = Decoder()
    return decoder.feed(stream) + decoder.close()


def parse_events(stream: bytes) -> list[Event]:
    """The events of a whole stream, comments left out."""
    return events(parse(stream))


def events(items: list[Event | Comment]) -> list[Event]:
    return [item for item in items if isinstance(item, Event)]


def comments(items: list[Event | Comment]) -> list[Comment]:
    return [item for item in items if isinstance(item, Comment)]
