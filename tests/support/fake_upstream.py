"""One fake OpenAI-compatible upstream for every test: aiohttp on a fixed loopback port, its
behaviour a ``Mode`` (data) that a test picks from the ones below, builds, or changes at run time.

The port survives ``stop()`` / ``start()``: a test takes the upstream down (open connections cut,
the port refusing) and brings it back where it was, as an engine restarting behind a service
address. The fake records every generation request (path, body, Authorization, connection), and
counts the handlers still running: aiohttp cancels a handler when its client (the gateway)
closes the connection, so ``open == 0`` means the gateway let go of everything.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web

from tests.support.gateway import free_port

WORDS = tuple(f" w{i}" for i in range(100))
GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")

Ending = Literal["done", "hang", "close", "reset"]


@dataclass(frozen=True)
class Mode:
    """What the fake does with a generation request.

    With ``body``, the answer is sent whole with ``status`` (an error before the first byte, a
    web page, an embeddings answer). Otherwise it is a 200 SSE stream: ``words`` of WORDS (None:
    the fake's ``tokens``), in the chat or completion shape the path asks for, then ``frames``
    as given, each write followed by ``interval_s`` (None: the fake's); then, with ``finish``,
    the finish chunk, usage and ``[DONE]``; then the ``ending``: "done" (the body ends), "hang"
    (silence until the fake stops: the gateway must let go), "close" (the connection closes
    mid-body) or "reset" (an RST, as when the process is killed). ``stall`` hangs before the
    headers instead; ``close_reused`` closes a kept-alive connection under its next request,
    as an upstream closing idle connections on its own schedule does."""

    status: int = 200
    body: bytes | None = None
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)
    stall: bool = False
    words: int | None = None
    frames: tuple[bytes, ...] = ()
    interval_s: float | None = None
    finish: bool = True
    ending: Ending = "done"
    close_reused: bool = False


def answer(document: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Mode:
    """A whole JSON answer."""
    return Mode(status=status, body=orjson.dumps(document), headers=headers or {})


def error(status: int = 500, message: str = "engine crashed", **fields: Any) -> Mode:
    """An OpenAI error body with this status, before any stream byte."""
    body = {"message": message, "type": "server_error", "code": None, **fields}
    return answer({"error": body}, status)


def sse_frames(*frames: bytes, interval_s: float = 0.0, ending: Ending = "done") -> Mode:
    """A 200 stream of exactly these frames (no words, no finish chunk, no [DONE] of its own)."""
    return Mode(words=0, frames=frames, interval_s=interval_s, finish=False, ending=ending)


def after_words(data: bytes, words: int = 2) -> Mode:
    """``words`` good tokens, then ``data`` as one data line, then silence."""
    return Mode(words=words, frames=(b"data: " + data + b"\n\n",), finish=False, ending="hang")


HEALTHY = Mode()  # the fake's tokens, finish, usage, [DONE]
DROP = Mode(words=3, finish=False, ending="reset")  # three tokens, then the connection is cut
CRASH = Mode(words=3, finish=False, ending="hang")  # three tokens, then wait for ``stop()``
HANG_BEFORE_HEADERS = Mode(stall=True)
HANG_AFTER_HEADERS = sse_frames(b": still here\n\n", ending="hang")
HANG_BETWEEN = Mode(words=2, finish=False, ending="hang")
# A token every 0.2 s for as long as any test runs, each within a between-tokens timeout.
DRIP = Mode(words=10_000, interval_s=0.2, finish=False, ending="hang")
GARBAGE_FIRST = sse_frames(b"data: <<<\x00\xff garbage >>>\n\n", ending="hang")
GARBAGE_AFTER = after_words(b"{this is not json")
HTML = Mode(body=b"<html><body>It works!</body></html>", content_type="text/html")
ERROR_JSON = error(500)
ERROR_PLAIN = Mode(status=500, body=b"Internal Server Error", content_type="text/plain")


def chat_chunk(text: str | None = None, finish: str | None = None) -> bytes:
    delta = {"content": text} if text is not None else {}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return _frame("chat.completion.chunk", {"choices": [choice]})


def completion_chunk(text: str | None = None, finish: str | None = None) -> bytes:
    choice = {"index": 0, "text": text or "", "finish_reason": finish}
    return _frame("text_completion", {"choices": [choice]})


def usage_chunk(prompt: int, completion: int) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    return _frame("chunk", {"choices": [], "usage": {**usage, "total_tokens": prompt + completion}})


def _frame(kind: str, fields: dict[str, Any]) -> bytes:
    body = {"id": "fake", "object": kind, "created": 0, "model": "fake", **fields}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def fake_text(tokens: int) -> str:
    """What a healthy fake with ``tokens`` tokens streams."""
    return "".join(WORDS[:tokens])


@dataclass(frozen=True)
class Received:
    """One generation request as the fake saw it."""

    path: str
    body: Any  # the JSON body (None if it was not JSON)
    authorization: str | None
    peer: Any  # the client's address: one per connection
    reused: bool  # it came on a connection an earlier request had used


class FakeUpstream:
    """An OpenAI-compatible server on a fixed loopback port; ``mode`` and ``health`` are what it
    does now. ``health`` is the status ``GET /health`` answers (None: it hangs until told
    otherwise, as a wedged server's would). With ``barrier`` N, generation requests wait until N
    have arrived before answering, so that concurrent requests all reach the upstream before the
    first one fails (a gateway may stop sending to an upstream after one failure)."""

    def __init__(
        self,
        mode: Mode = HEALTHY,
        *,
        tokens: int = 3,
        interval_s: float = 0.0,
        health: int | None = 200,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = mode
        self.tokens = tokens
        self.interval_s = interval_s
        self.requests: list[Received] = []
        self.health_checks = 0
        self.metrics: str | None = None  # GET /metrics's body
        self.metrics_reads = 0
        self.open = 0  # generation handlers running now
        self.hanging = 0  # of those, the ones silent until the fake stops
        self._health = health
        self._unwedged = asyncio.Event()
        self._release = asyncio.Event()
        self._barrier = 0
        self._arrived = asyncio.Event()
        self._at_barrier = 0
        self._runner: web.AppRunner | None = None
        self._transports: set[asyncio.Transport] = set()
        self._connections: set[int] = set()

    def set(self, mode: Mode, *, health: int | None = 200, barrier: int = 0) -> None:
        self.mode, self.health = mode, health
        self._barrier, self._at_barrier = barrier, 0
        self._arrived = asyncio.Event()

    @property
    def health(self) -> int | None:
        return self._health

    @health.setter
    def health(self, status: int | None) -> None:
        self._health = status
        if status is not None:
            self._unwedged.set()  # health checks hanging so far answer now
        elif self._unwedged.is_set():
            self._unwedged = asyncio.Event()

    @property
    def received(self) -> int:
        return len(self.requests)

    @property
    def bodies(self) -> list[Any]:
        return [r.body for r in self.requests]

    @property
    def authorizations(self) -> list[str | None]:
        return [r.authorization for r in self.requests]

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        assert self._runner is None, "already running"
        app = web.Application()
        for path in GENERATION_ROUTES:
            app.router.add_post(path, self._generate)
        app.router.add_get("/health", self._health_check)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True).start()
        self._release = asyncio.Event()
        self._runner = runner

    async def stop(self) -> None:
        """The server dies: open connections are cut (no clean end), the port refuses."""
        if self._runner is None:
            return
        for transport in list(self._transports):
            transport.abort()  # an RST, as when the process is killed
        self._release.set()
        self._unwedged.set()
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def _health_check(self, _: web.Request) -> web.StreamResponse:
        self.health_checks += 1
        if self._health is None:
            await self._unwedged.wait()  # wedged until told otherwise, or stopped
        if self._health is None or not self.running:
            return web.Response(status=503)
        body = {"status": "ok" if self._health == 200 else "error"}
        return web.json_response(body, status=self._health)

    async def _metrics(self, _: web.Request) -> web.StreamResponse:
        """``metrics`` as Prometheus text (what a vllm serve would say of its load); 404 when
        it is None, as from a server that exports none."""
        self.metrics_reads += 1
        if self.metrics is None:
            return web.Response(status=404)
        return web.Response(text=self.metrics, content_type="text/plain")

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        transport = request.transport
        reused = transport is not None and id(transport) in self._connections
        peer = transport.get_extra_info("peername") if transport is not None else None
        self.requests.append(
            Received(request.path, _json(raw), request.headers.get("Authorization"), peer, reused)
        )
        self.open += 1
        if transport is not None:
            self._connections.add(id(transport))
            self._transports.add(transport)
        try:
            await self._wait_at_barrier()
            return await self._answer(request, self.mode, reused)
        finally:
            self.open -= 1
            if transport is not None:
                self._transports.discard(transport)

    async def _wait_at_barrier(self) -> None:
        if self._barrier:
            self._at_barrier += 1
            if self._at_barrier >= self._barrier:
                self._arrived.set()
            await self._arrived.wait()

    async def _answer(self, request: web.Request, mode: Mode, reused: bool) -> web.StreamResponse:
        if mode.close_reused and reused and request.transport is not None:
            request.transport.close()  # closed under the request: nothing is sent
            return web.Response(status=500)
        if mode.stall:
            await self._hang()
            return web.Response(status=503)
        if mode.body is not None:
            return web.Response(
                status=mode.status,
                body=mode.body,
                content_type=mode.content_type,
                headers=dict(mode.headers),
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await self._stream(response, request.path.endswith("/chat/completions"), mode)
        if mode.ending == "hang":
            await self._hang()
        elif mode.ending in ("close", "reset") and request.transport is not None:
            # What was sent reaches the gateway first: bytes still unread in its buffer when
            # the connection breaks would be lost, and a test wants them to see the error
            # arrive after them.
            await asyncio.sleep(0.05)
            if mode.ending == "close":
                request.transport.close()
            else:
                request.transport.abort()
        return response

    async def _stream(self, response: web.StreamResponse, chat: bool, mode: Mode) -> None:
        interval = self.interval_s if mode.interval_s is None else mode.interval_s
        count = self.tokens if mode.words is None else mode.words
        chunk = chat_chunk if chat else completion_chunk
        words = (chunk(WORDS[i % len(WORDS)]) for i in range(count))
        for frame in itertools.chain(words, mode.frames):
            await response.write(frame)
            await asyncio.sleep(interval)
        if mode.finish:
            await response.write(chunk(finish="length"))
            await response.write(usage_chunk(4, count))
            await response.write(b"data: [DONE]\n\n")

    async def _hang(self) -> None:
        self.hanging += 1
        try:
            await self._release.wait()
        finally:
            self.hanging -= 1


def _json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None
