"""Shared pieces of the admission tests: settings, SSE reading, raw sockets, polling."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from llmserve.config import AdmissionConfig, Limits, Settings, SimulatedModel
from llmserve.scheduling.admission import Admission

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


async def eventually(condition: Callable[[], bool], within: float = 2.0, what: str = "") -> float:
    """Poll until ``condition`` holds; returns how long it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within} s: {what or condition}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


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
    frames: list[tuple[float, str]] = field(default_factory=list)
    body: bytes = b""
    error: BaseException | None = None
    ended: float = 0.0  # when the body ended or broke off (monotonic)

    @property
    def data(self) -> list[tuple[float, str]]:
        return [(t, f.removeprefix("data: ")) for t, f in self.frames if f.startswith("data:")]

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(d) for _, d in self.data if d != "[DONE]"]

    @property
    def done(self) -> bool:
        return bool(self.data) and self.data[-1][1] == "[DONE]"

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
    error = json.loads(body)["error"]
    assert error["code"] == code
    assert error["type"] == "server_error"
    assert isinstance(error["message"], str) and error["message"]


async def read_stream(
    response: httpx.Response, started: float, on_first_data: asyncio.Event | None = None
) -> StreamResult:
    """Read a response to its end (or to a broken connection), frame by frame, with times."""
    result = StreamResult(response.status_code, response.headers, started)
    if response.status_code != 200:
        result.body = await response.aread()
        result.ended = time.monotonic()
        return result
    buffer = b""
    try:
        async for chunk in response.aiter_raw():
            now = time.monotonic()
            buffer += chunk
            while b"\n\n" in buffer:
                frame, buffer = buffer.split(b"\n\n", 1)
                result.frames.append((now, frame.decode()))
                if on_first_data is not None and frame.startswith(b"data:"):
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
