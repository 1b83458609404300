"""uvicorn's httptools protocol with the bounds it lacks: a request head (request line and
headers) larger than ``max_head_bytes`` is refused with 431, and one not complete within
``head_timeout_s`` of its first byte (or of the connection, for the first request) gets 408 and
a close. The parser's own refusals get an OpenAI error body. Without these, a client that
trickles or never finishes its headers holds a connection and memory for as long as it likes
(slowloris): uvicorn's only timer is the keep-alive one between requests.

A subclass, not a fork: the hooks used (``data_received``, ``on_headers_complete``,
``on_message_complete``, ``send_400_response``) are the parser callbacks uvicorn's protocol is
built on; tests/reliability pins the behaviour if a uvicorn release moves them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llmserve.api.security import SECURITY_HEADERS
from llmserve.wire.errors import error_body

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class _HeadTooLarge(Exception):
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = 64 * 1024
    head_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True
        self._head_bytes = 0  # raw bytes read while in a head (bounds an unfinished line)
        self._parsed_head = 0  # request line and headers as parsed (a head read in one go)
        self._refusal: tuple[int, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._arm_head_timer()
            self._head_bytes += len(data)
        super().data_received(data)
        # Checked after parsing, so a body that came in the same read as its headers (which
        # completed them) is not counted as head.
        if self._in_head and self._head_bytes > self.max_head_bytes:
            self._refuse(431, f"the request head is over {self.max_head_bytes} bytes")

    def on_url(self, url: bytes) -> None:
        self._parsed_head += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parsed_head += len(name) + len(value) + 4  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._disarm_head_timer()
        if self._parsed_head > self.max_head_bytes:
            # Raised through the parser, which stops; uvicorn then calls send_400_response.
            self._refusal = (431, f"the request head is over {self.max_head_bytes} bytes")
            raise _HeadTooLarge
        self._parsed_head = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # the next request on this connection; its timer starts at its
        self._head_bytes = 0  # first byte (the keep-alive timeout covers the wait for it)
        self._parsed_head = 0

    def send_400_response(self, msg: str) -> None:
        self._refuse(*(self._refusal or (400, "the request is not valid HTTP/1.1")))

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes == 0 and self.cycle is None:
            self.transport.close()  # connected and never said anything
            return
        self._refuse(408, f"the request head did not arrive within {self.head_timeout_s:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """An OpenAI error body and a close, written directly: no request exists yet."""
        if self.transport.is_closing():
            return
        self._disarm_head_timer()
        code = {400: "invalid_http", 408: "request_timeout"}.get(
            status, "request_header_fields_too_large"
        )
        body = orjson.dumps(error_body(message, "invalid_request_error", code=code))
        lines = [b"HTTP/1.1 %d %s" % (status, _REASONS[status])]
        lines += [name + b": " + value for name, value in self.server_state.default_headers]
        lines += [name + b": " + value for name, value in SECURITY_HEADERS]
        lines += [
            b"content-type: application/json",
            b"content-length: %d" % len(body),
            b"connection: close",
        ]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.transport.close()


def guarded_protocol(max_head_bytes: int, head_timeout_s: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with these bounds (uvicorn instantiates it per connection)."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"max_head_bytes": max_head_bytes, "head_timeout_s": head_timeout_s},
    )
