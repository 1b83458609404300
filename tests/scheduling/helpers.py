"""Shared pieces of the admission tests: settings, streams read with their times, raw sockets."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from llmserve.config import AdmissionConfig, Limits, Settings, SimulatedModel
from llmserve.scheduling.admission import Admission
from tests.support import sse
from tests.support.errors import assert_openai_error
from tests.support.sse import Comment, Event

PROMPT = "hello there"


def model(
    name: str,
    *,
    tokens_per_second: float,
    first_token_latency_s: float = 0.05,
    **admission: Any,
) -> SimulatedModel:
    return SimulatedModel(
        engine="simulated",
        name=name,
        tokens_per_second=tokens_per_second,
        first_token_latency_s=first_token_latency_s,
        admission=AdmissionConfig(**admission),
    )


def settings(*models: SimulatedModel, **overrides: Any) -> Settings:
    return Settings(models=list(models), limits=Limits(), **overrides)


def completion(
    model_name: str, max_tokens: int, *, stream: bool = False, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model_name,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "stream": stream,
    }
    body.update(extra)
    return body


def assert_idle(admission: Admission) -> None:
    """Nothing runs, nothing waits, and no token or waiter bookkeeping is left behind."""
    assert admission.in_flight == 0
    assert admission.queued == 0
    assert admission.state.waiting_tokens == 0
    assert admission.state.running == {}
    assert admission.state.waiting == {}
    assert admission._waiters == {}


@dataclass
class StreamResult:
    """What a client saw of one streaming response, frame by frame."""

    status: int
    headers: httpx.Headers
    started: float  # when the status line arrived (monotonic)
    frames: list[Event | Comment] = field(default_factory=list)  # each stamped with its arrival
    body: bytes = b""
    error: BaseException | None = None
    ended: float = 0.0  # when the body ended or broke off (monotonic)

    @property
    def events(self) -> list[Event]:
        return sse.events(self.frames)

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [e.json() for e in self.events if not e.done]

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1].done

    @property
    def token_chunks(self) -> int:
        """Chunks carrying generated text (the simulated engine sends one token per chunk)."""
        return sum(1 for c in self.chunks if c.get("choices") and c["choices"][0].get("text"))


def retry_after(headers: httpx.Headers) -> int:
    raw = headers.get("retry-after")
    assert raw is not None, "a 503 must carry Retry-After"
    assert raw.isdigit(), f"Retry-After must be whole seconds, got {raw!r}"
    value = int(raw)
    assert value >= 1
    return value


def assert_overloaded(response: httpx.Response | StreamResult, code: str) -> None:
    """A 503 with Retry-After and an OpenAI error body carrying ``code`` (never an SSE stream)."""
    if isinstance(response, StreamResult):
        status, headers, body = response.status, response.headers, response.body
        assert response.frames == []
    else:
        status, headers, body = response.status_code, response.headers, response.content
    assert status == 503, body
    assert headers["content-type"].startswith("application/json")
    retry_after(headers)
    assert_openai_error(body, type="server_error", code=code)


async def read_stream(
    response: httpx.Response, started: float, on_first_data: asyncio.Event | None = None
) -> StreamResult:
    """Read a response to its end (or to a broken connection), frame by frame, with times."""
    result = StreamResult(response.status_code, response.headers, started)
    if response.status_code != 200:
        result.body = await response.aread()
        result.ended = time.monotonic()
        return result
    try:
        async for item in sse.aiter_sse(response):
            result.frames.append(item)
            if on_first_data is not None and isinstance(item, Event):
                on_first_data.set()
    except httpx.HTTPError as exc:  # the server closed the connection mid-stream
        result.error = exc
    result.ended = time.monotonic()
    return result


async def stream_request(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    on_first_data: asyncio.Event | None = None,
) -> StreamResult:
    """POST a streaming request and read it to the end; sets ``on_first_data`` at the first
    ``data:`` frame."""
    async with client.stream("POST", path, json=body, headers=headers) as response:
        return await read_stream(response, time.monotonic(), on_first_data)


class RawRequest:
    """An HTTP request over a bare socket, so a test can drop the connection at any moment."""

    def __init__(self, url: str, path: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        self._host, port = url.removeprefix("http://").split(":")
        self._port = int(port)
        self._path = path
        self._body = json.dumps(body).encode()
        self._headers = headers
        self._writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None

    async def send(self) -> None:
        self.reader, self._writer = await asyncio.open_connection(self._host, self._port)
        head = [
            f"POST {self._path} HTTP/1.1",
            "Host: test",
            "Content-Type: application/json",
            f"Content-Length: {len(self._body)}",
            *(f"{k}: {v}" for k, v in self._headers.items()),
        ]
        self._writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + self._body)
        await self._writer.drain()

    async def close(self) -> None:
        assert self._writer is not None
        self._writer.close()
        await self._writer.wait_closed()
