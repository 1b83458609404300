"""A test client that reads one OpenAI request to its end and says what it saw: status, text,
finish reasons, the error (whole body or in band), keep-alives, when each token arrived.
Shared by the routing and the fault suites, which look at the same things."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from tests.support.sse import Comment, Event, aiter_sse

MESSAGES = [{"role": "user", "content": "Tell me about routing."}]
PROMPT = "Once upon a route"


@dataclass
class Seen:
    """What one client saw of one request, the same shape for whole responses and streams."""

    status: int
    content_type: str
    stream: bool
    headers: httpx.Headers
    model: str | None = None
    text: str = ""
    error: dict[str, Any] | None = None  # the OpenAI error object, whole body or in-band
    in_band: bool = False  # the error came inside a 200 stream
    done: bool = False  # the stream ended with data: [DONE]
    finish_reasons: list[str] = field(default_factory=list)
    events_after_error: int = 0  # data events other than [DONE] after an in-band error
    keepalives: int = 0  # SSE comments
    arrivals: list[float] = field(default_factory=list)  # monotonic time of each text delta
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and bool(self.finish_reasons)

    @property
    def code(self) -> str | None:
        return None if self.error is None else self.error.get("code")

    @property
    def max_gap_s(self) -> float:
        gaps = [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]
        return max(gaps, default=0.0)


async def call(
    url: str,
    model: str,
    *,
    stream: bool = True,
    route: str = "chat",
    max_tokens: int = 5,
    headers: dict[str, str] | None = None,
    timeout_s: float = 30.0,
    **extra: Any,
) -> Seen:
    """One request, read to its end. The client never gives up first: ``timeout_s`` is a
    safety net that fails the test, a gateway must end every request by itself."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": stream}
    if route == "chat":
        body["messages"] = MESSAGES
        path = "/v1/chat/completions"
    else:
        body["prompt"] = PROMPT
        path = "/v1/completions"
    body.update(extra)
    started = time.monotonic()
    async with (
        httpx.AsyncClient(base_url=url, timeout=timeout_s) as client,
        client.stream("POST", path, json=body, headers=headers) as response,
    ):
        seen = Seen(
            response.status_code,
            response.headers.get("content-type", ""),
            stream,
            response.headers,
        )
        if not seen.content_type.startswith("text/event-stream"):
            data = orjson.loads(await response.aread())
            if "error" in data:
                seen.error = data["error"]
            else:
                seen.model = data.get("model")
                for choice in data["choices"]:
                    seen.text += choice["message"]["content"] if route == "chat" else choice["text"]
                    seen.finish_reasons.append(choice["finish_reason"])
        else:
            async for item in aiter_sse(response):
                _read_item(seen, item)
    seen.elapsed_s = time.monotonic() - started
    return seen


def _read_item(seen: Seen, item: Event | Comment) -> None:
    if isinstance(item, Comment):
        seen.keepalives += 1
        return
    if item.done:
        seen.done = True
        return
    data = item.json()
    if seen.error is not None:
        seen.events_after_error += 1
    if "error" in data:
        seen.error = data["error"]
        seen.in_band = True
        return
    seen.model = data.get("model", seen.model)
    for choice in data.get("choices") or ():
        text = (choice.get("delta") or {}).get("content") or choice.get("text")
        if text:
            seen.text += text if isinstance(text, str) else repr(text)
            seen.arrivals.append(item.at)
        if choice.get("finish_reason"):
            seen.finish_reasons.append(choice["finish_reason"])
