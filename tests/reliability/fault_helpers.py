"""Fault injection helpers: an OpenAI-compatible upstream that misbehaves on command, a gateway
in front of it (plus a healthy second model), and clients that report exactly what they saw.

Everything runs on 127.0.0.1 in the test's event loop. The misbehaving upstream keeps its port
across ``stop()`` / ``start()``, so a test can take it down (connections refused), bring it back
and watch the gateway recover, as an engine restarting behind a service address would.

The tests look at the gateway only through HTTP and ``/metrics`` (not its internals, which may
change), plus what the fake upstream itself saw (how many of its handlers are still running: a
gateway that gave up on a request must also have closed the upstream connection).
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiohttp import web

from llmserve.config import Limits, Settings, UpstreamModel
from tests import sse_client
from tests.conftest import RunningServer, free_port, serve, start_openai_server
from tests.observability.helpers import Scrape, eventually, scrape
from tests.sse_client import Seen

# Model names no other test uses: the Prometheus counters are process-global, and the tests
# compare scrapes before and after on these labels.
FLAKY = "fault-flaky"
STEADY = "fault-steady"
WORDS = tuple(f" w{i}" for i in range(100))

# What a misbehaving upstream does with a generation request.
MODES = (
    "healthy",  # streams its tokens, finish, usage, [DONE]
    "drop",  # a few tokens, then the TCP connection is cut (no [DONE], no clean EOF)
    "crash",  # a few tokens, then waits for ``stop()`` (the whole server dies mid-stream)
    "hang_before_headers",  # accepts the request, never answers
    "hang_after_headers",  # 200 + SSE headers and one comment, then silence
    "hang_between",  # two tokens, then silence
    "drip",  # a token every ``drip_s``, forever (each within the between-tokens timeout)
    "garbage_first",  # a non-JSON data line first, then silence
    "garbage_after",  # two tokens, a non-JSON data line, then silence
    "payload",  # two tokens, then ``payload`` verbatim as one data line, then silence
    "html",  # 200 with a web page (a URL pointing at the wrong server)
    "error_json",  # 500 with an OpenAI error body
    "error_plain",  # 500 with a plain-text body (a proxy or a crashed worker)
)


# The error codes a client may see for each kind of upstream failure: the generic code of one
# upstream engine, or the specific one of the replica-routing engine (issue 7).
UNREACHABLE = frozenset({"engine_unavailable", "upstream_unreachable", "no_healthy_replica"})
BROKEN = frozenset({"engine_error", "upstream_broken_stream"})
MALFORMED = frozenset({"engine_error", "upstream_malformed"})
HTTP_ERROR = frozenset({"engine_error", "upstream_http_error"})
FIRST_TOKEN = frozenset({"timeout", "first_token_timeout"})
BETWEEN_TOKENS = frozenset({"timeout", "between_tokens_timeout"})
REQUEST_TIMEOUT = frozenset({"request_timeout"})


def chunk(chat: bool, text: str | None = None, finish: str | None = None) -> bytes:
    if chat:
        delta = {"content": text} if text is not None else {}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish}
        kind = "text_completion"
    body = {"id": "fake", "object": kind, "created": 0, "model": "fake", "choices": [choice]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


def usage_chunk(prompt: int, completion: int) -> bytes:
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    body = {"id": "fake", "object": "chunk", "created": 0, "model": "fake", "choices": []}
    return b"data: " + orjson.dumps({**body, "usage": usage}) + b"\n\n"


class FaultyUpstream:
    """An OpenAI-compatible server on a fixed loopback port whose behaviour is set at run time.

    ``health`` is what ``GET /health`` answers (None: it hangs until told otherwise, as a
    wedged server's would). With ``barrier`` N, generation requests wait until N have arrived
    before misbehaving, so that concurrent requests all reach the upstream before the first
    one fails (a gateway may stop sending to an upstream after one failure).
    ``open`` counts generation handlers still running: aiohttp cancels a handler when its
    client (the gateway) closes the connection, so 0 means the gateway let go of everything.
    """

    def __init__(self, *, tokens: int = 6, interval_s: float = 0.02) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mode = "healthy"
        self.health: int | None = 200
        self.tokens = tokens
        self.interval_s = interval_s
        self.drip_s = 0.2
        self.payload = b""
        self.barrier = 0
        self.received = 0  # generation requests received
        self.open = 0  # generation handlers running now
        self.mid_stream = 0  # "crash" handlers that sent their tokens and wait for the end
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()
        self._unwedged = asyncio.Event()
        self._arrived = asyncio.Event()
        self._at_barrier = 0
        self._transports: set[asyncio.BaseTransport] = set()

    def set(self, mode: str, *, health: int | None = 200, barrier: int = 0) -> None:
        assert mode in MODES, mode
        self.mode = mode
        self.health = health
        if health is None:
            self._unwedged = asyncio.Event()
        else:
            self._unwedged.set()  # health checks hanging so far answer now
        self.barrier = barrier
        self._at_barrier = 0
        self._arrived = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        assert self._runner is None, "already running"
        runner = await start_openai_server(self.port, self._generate, self._health)
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

    async def _health(self, _: web.Request) -> web.StreamResponse:
        if self.health is None:
            await self._unwedged.wait()  # wedged until set() says otherwise
        if self.health is None or not self.running:
            return web.Response(status=503)
        body = {"status": "ok" if self.health == 200 else "error"}
        return web.json_response(body, status=self.health)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        chat = request.path.endswith("/chat/completions")
        self.received += 1
        self.open += 1
        transport = request.transport
        if transport is not None:
            self._transports.add(transport)
        try:
            if self.barrier:
                self._at_barrier += 1
                if self._at_barrier >= self.barrier:
                    self._arrived.set()
                await self._arrived.wait()
            return await self._behave(request, chat, self.mode)
        finally:
            self.open -= 1
            if transport is not None:
                self._transports.discard(transport)

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        return response

    async def _words(self, response: web.StreamResponse, chat: bool, count: int) -> None:
        for word in WORDS[:count]:
            await response.write(chunk(chat, word))
            await asyncio.sleep(self.interval_s)

    async def _behave(self, request: web.Request, chat: bool, mode: str) -> web.StreamResponse:
        if mode == "hang_before_headers":
            await self._release.wait()
            return web.Response(status=503)
        if mode == "error_json":
            error = {"error": {"message": "engine crashed", "type": "server_error", "code": None}}
            return web.json_response(error, status=500)
        if mode == "error_plain":
            return web.Response(status=500, text="Internal Server Error")
        if mode == "html":
            return web.Response(
                text="<html><body>It works!</body></html>", content_type="text/html"
            )
        response = await self._sse(request)
        if mode == "healthy":
            await self._words(response, chat, self.tokens)
            await response.write(chunk(chat, finish="length"))
            await response.write(usage_chunk(4, self.tokens))
            await response.write(b"data: [DONE]\n\n")
            return response
        if mode == "hang_after_headers":
            await response.write(b": still here\n\n")
        elif mode == "drop":
            # Spaced out as a real server's tokens are: bytes still unread in the gateway's
            # buffer when the connection breaks would be lost, which is fine, but the test
            # wants at least one token through to see the error arrive in-band.
            await self._words(response, chat, 3)
            await asyncio.sleep(0.05)
            assert request.transport is not None
            request.transport.abort()
            return response
        elif mode == "crash":
            await self._words(response, chat, 3)
            self.mid_stream += 1
        elif mode in ("hang_between", "garbage_after", "payload"):
            await self._words(response, chat, 2)
            if mode == "garbage_after":
                await response.write(b"data: {this is not json\n\n")
            elif mode == "payload":
                await response.write(b"data: " + self.payload + b"\n\n")
        elif mode == "garbage_first":
            await response.write(b"data: <<<\x00\xff garbage >>>\n\n")
        elif mode == "drip":
            for word in WORDS * 100:
                await response.write(chunk(chat, word))
                await asyncio.sleep(self.drip_s)
        await self._release.wait()  # never ends on its own: the gateway must let go
        return response


# ---------------------------------------------------------------------------------------------
# The gateway in front: FLAKY is the misbehaving upstream, STEADY a healthy one
# ---------------------------------------------------------------------------------------------


def fault_settings(
    flaky: FaultyUpstream,
    steady: FaultyUpstream,
    *,
    keepalive_interval_s: float = 10.0,
    request_timeout_s: float = 600.0,
    **flaky_options: Any,
) -> Settings:
    options: dict[str, Any] = {
        "connect_timeout_s": 1.0,
        "first_token_timeout_s": 0.6,
        "between_tokens_timeout_s": 0.6,
        **flaky_options,
    }
    return Settings(
        models=[
            UpstreamModel(engine="openai", name=FLAKY, url=flaky.url, **options),
            UpstreamModel(engine="openai", name=STEADY, url=steady.url),
        ],
        limits=Limits(request_timeout_s=request_timeout_s),
        keepalive_interval_s=keepalive_interval_s,
    )


@dataclass
class Bench:
    gateway: RunningServer
    flaky: FaultyUpstream
    steady: FaultyUpstream

    @property
    def url(self) -> str:
        return self.gateway.url


@asynccontextmanager
async def fault_bench(start_flaky: bool = True, **settings: Any) -> AsyncIterator[Bench]:
    """A gateway serving FLAKY (a FaultyUpstream, healthy until told otherwise) and STEADY
    (a healthy upstream streaming 25 tokens 30 ms apart, long enough to overlap any fault)."""
    flaky = FaultyUpstream()
    steady = FaultyUpstream(tokens=25, interval_s=0.03)
    await steady.start()
    if start_flaky:
        await flaky.start()
    try:
        async with serve(fault_settings(flaky, steady, **settings)) as gateway:
            # Engines start in the background: begin once the gateway knows where each stands.
            models = {FLAKY: start_flaky, STEADY: True}
            await ready_becomes(gateway.url, 200 if start_flaky else 503, models, within=10)
            yield Bench(gateway, flaky, steady)
    finally:
        await flaky.stop()
        await steady.stop()


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


# The fault upstreams stream up to 100 words; a request asks for 50 of them, and may take
# 20 s before the client's safety net fails the test.
call = functools.partial(sse_client.call, max_tokens=50, timeout_s=20.0)


def assert_completed(seen: Seen, tokens: int) -> None:
    """A request that succeeded completely: all its words, a finish reason, no error."""
    assert seen.status == 200, seen
    assert seen.error is None, seen
    assert seen.text == "".join(WORDS[:tokens]), seen
    assert seen.finish_reasons == ["length"], seen
    if seen.stream:
        assert seen.done, seen


def assert_error_status(seen: Seen, status: int, codes: frozenset[str]) -> None:
    """Refused before any byte: the OpenAI error body with its own status."""
    assert seen.status == status, seen
    assert seen.content_type == "application/json", seen
    assert seen.error is not None, seen
    assert seen.error["code"] in codes, seen
    assert seen.error["type"] == "server_error", seen
    assert set(seen.error) == {"message", "type", "param", "code"}, seen
    assert seen.text == "", seen


def assert_in_band_error(
    seen: Seen, codes: frozenset[str], *, after_tokens: bool = True, words: str = "".join(WORDS)
) -> None:
    """Failed after the stream opened: 200, what came before, then one error event and
    data: [DONE]; no finish reason pretends the generation ended normally."""
    assert seen.status == 200, seen
    assert seen.content_type.startswith("text/event-stream"), seen
    assert seen.in_band and seen.error is not None, seen
    assert seen.error["code"] in codes, seen
    assert seen.error["type"] == "server_error", seen
    assert seen.done, seen
    assert seen.finish_reasons == [], seen
    if after_tokens:
        assert seen.text, seen
        assert words.startswith(seen.text), seen


# ---------------------------------------------------------------------------------------------
# /metrics and /ready
# ---------------------------------------------------------------------------------------------


def statuses(s: Scrape, model: str) -> dict[str, float]:
    """llmserve_requests_total of one model, by status."""
    found: dict[str, float] = {}
    for (name, labels), value in s.samples.items():
        if name == "llmserve_requests_total" and ("model", model) in labels:
            status = dict(labels)["status"]
            found[status] = found.get(status, 0.0) + value
    return found


def rejections(s: Scrape) -> dict[str, float]:
    """llmserve_rejections_total by reason (all keys)."""
    found: dict[str, float] = {}
    for (name, labels), value in s.samples.items():
        if name == "llmserve_rejections_total":
            reason = dict(labels)["reason"]
            found[reason] = found.get(reason, 0.0) + value
    return found


def upstream_failures(s: Scrape, model: str) -> dict[str, float] | None:
    """llmserve_upstream_failures_total of one model by kind, where the gateway has that
    metric (replica routing, issue 7); None where it does not."""
    if "llmserve_upstream_failures" not in s.text:
        return None
    found: dict[str, float] = {}
    for (name, labels), value in s.samples.items():
        if name == "llmserve_upstream_failures_total" and ("model", model) in labels:
            kind = dict(labels)["kind"]
            found[kind] = found.get(kind, 0.0) + value
    return found


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    keys = set(after) | set(before)
    changed = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}
    return {k: v for k, v in changed.items() if v}


async def settled_statuses(
    url: str, before: Scrape, expected: dict[str, dict[str, float]], within: float = 5.0
) -> Scrape:
    """Scrape until every model's requests_total delta adds up to its expected count (a
    stream is recorded just after its last byte), then check the deltas by status exactly."""
    deadline = time.monotonic() + within
    while True:
        now = await scrape(url)
        totals = {m: sum(delta(statuses(now, m), statuses(before, m)).values()) for m in expected}
        wanted = {m: sum(v.values()) for m, v in expected.items()}
        if totals == wanted or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    for model, by_status in expected.items():
        assert delta(statuses(now, model), statuses(before, model)) == by_status, model
    return now


async def ready_becomes(
    url: str, status: int, models: dict[str, bool], within: float = 8.0
) -> dict[str, Any]:
    """Poll /ready until it answers ``status`` with these models' states. A gateway may learn
    an upstream's state from its own checks (every few seconds) and from failed requests, so
    readiness is allowed to lag the truth a little, never to stay wrong. Each answer must come
    quickly: a readiness probe has a timeout of its own."""
    deadline = time.monotonic() + within
    while True:
        got, body, elapsed = await ready(url)
        assert elapsed < 6.0, f"/ready took {elapsed:.1f} s"
        if (got, body.get("models")) == (status, models):
            return body
        assert time.monotonic() < deadline, f"/ready still {got} {body} after {within} s"
        await asyncio.sleep(0.1)


async def ready(url: str) -> tuple[int, dict[str, Any], float]:
    """GET /ready: status, body, and how long it took to answer."""
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.get("/ready")
    return response.status_code, response.json(), time.monotonic() - started


async def assert_nothing_held(url: str, *upstreams: FaultyUpstream, within: float = 5.0) -> None:
    """In-flight and queue gauges back to 0 for every model, and no upstream handler still
    running (the gateway closed every upstream connection it gave up on)."""
    gauges = (
        "llmserve_requests_in_flight",
        "llmserve_queue_requests",
        "llmserve_queue_tokens",
        "llmserve_replica_requests_in_flight",  # where replica routing (issue 7) exists
    )

    async def clear() -> bool:
        s = await scrape(url)
        return all(s.value(g) == 0 for g in gauges) and all(u.open == 0 for u in upstreams)

    try:
        await eventually(clear, within, "gauges at 0 and no upstream request open")
    except AssertionError:
        s = await scrape(url)
        held = {g: s.value(g) for g in gauges}
        open_ = [u.open for u in upstreams]
        raise AssertionError(f"held: {held}, upstream open: {open_}") from None


# ---------------------------------------------------------------------------------------------
# A gateway in its own process (for the soak: RSS from /proc, stderr kept for the verdict)
# ---------------------------------------------------------------------------------------------


@dataclass
class GatewayProcess:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def rss_bytes(self) -> int:
        """Resident set size of the server process, from /proc (Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")


@asynccontextmanager
async def gateway_process(
    config: Path, *, start_within_s: float = 30.0
) -> AsyncIterator[GatewayProcess]:
    """``python -m llmserve serve --config FILE`` on a free port, until /ready answers 200.

    The suite's LLMSERVE_* environment (auth off) is not passed on: the file says everything.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
    log = config.with_suffix(".log")
    with log.open("wb") as stderr:
        process = subprocess.Popen(  # noqa: ASYNC220 - starting a server, not waiting on it
            [
                sys.executable,
                "-m",
                "llmserve",
                "serve",
                "--config",
                str(config),
                "--port",
                str(port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            deadline = time.monotonic() + start_within_s
            while True:
                assert process.poll() is None, f"gateway exited: {log.read_text()[-2000:]}"
                try:
                    if (await client.get("/ready")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "gateway process did not become ready"
                await asyncio.sleep(0.1)
        yield GatewayProcess(url, process, log)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
