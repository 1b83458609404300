"""SSE framing. Payloads are JSON (orjson), so a token holding a newline cannot break a frame:
JSON escapes it, and a ``data:`` line never contains a raw line break."""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def data(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def event(name: str, payload: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def comment(text: str = "") -> bytes:
    """An SSE comment: ignored by clients, keeps proxies from timing out an idle stream."""
    return b": " + text.replace("\n", " ").encode() + b"\n\n"
