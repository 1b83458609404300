"""A small async load generator over the OpenAI API (streaming completions or chat), shared by
the benchmarks: per request TTFT, inter-token latencies, end-to-end latency and output tokens,
at a fixed concurrency (closed loop) or on a fixed arrival schedule (open loop).

A request never raises: an error response, a dropped stream or a connection failure comes back
as a ``Result`` with its HTTP status (0 when there was none) and an ``error`` category.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import orjson

Endpoint = Literal["completions", "chat"]
PATHS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True, slots=True)
class Job:
    prompt: str
    max_tokens: int
    # The prompt length the job was built for (approximate; the server's count is in Result).
    prompt_tokens: int = 0


@dataclass(slots=True)
class Result:
    tokens: int
    ttft_s: float
    e2e_s: float
    status: int = 200
    # Gaps between successive chunks that carried text (one per token where the server streams
    # a token per chunk).
    itl_s: list[float] = field(default_factory=list)
    # None for a request that completed; else "http", "stream", "dropped", "connection",
    # "timeout" or "protocol" (with the HTTP status in ``status``, 0 when there was none).
    error: str | None = None
    detail: str = ""
    # When the request was sent, and when it was due (open loop), from the start of its run.
    start_s: float = 0.0
    scheduled_s: float | None = None
    prompt_tokens: int | None = None  # the server's count (usage), when it reports one
    job: Job | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - TTFT) / (tokens - 1)."""
        if not self.ok or self.tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1)

    @property
    def error_key(self) -> str | None:
        """What errors are counted by: the HTTP status, or the failure where there was none
        (or where it came after a 200)."""
        if self.ok:
            return None
        if self.status not in (0, 200):
            return str(self.status)
        return self.error or "unknown"


@dataclass(slots=True)
class LoadRun:
    target: str
    concurrency: int  # clients in a closed loop; 0 for an open loop
    seconds: float
    results: list[Result] = field(default_factory=list)
    rate: float | None = None  # arrivals per second in an open loop

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.ok]

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.ok) / self.seconds

    def pct(self, attr: str, q: float) -> float:
        values = sorted(getattr(r, attr) for r in self.ok)
        if not values:
            return float("nan")
        return float(values[min(len(values) - 1, int(q * len(values)))])

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.ok))


def request_body(model: str, job: Job, endpoint: Endpoint = "completions") -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": job.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": job.prompt}]
    else:
        body["prompt"] = job.prompt
    return body


def _text(chunk: dict[str, Any]) -> bool:
    """Whether a streamed chunk carries generated text (a chat role chunk does not)."""
    for choice in chunk.get("choices") or ():
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    job: Job,
    *,
    endpoint: Endpoint = "completions",
    t0: float | None = None,
) -> Result:
    """One streaming request; ``t0`` (perf_counter) is the start of the run it belongs to."""
    start = time.perf_counter()
    result = Result(0, 0.0, 0.0, 0, start_s=start - (start if t0 is None else t0), job=job)
    stamps: list[float] = []
    chunks = 0
    done = False
    body = request_body(model, job, endpoint)
    try:
        async with session.post(url + PATHS[endpoint], json=body) as r:
            result.status = r.status
            if r.status != 200:
                result.error = "http"
                result.detail = (await r.read())[:300].decode(errors="replace")
            else:
                async for raw in r.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    chunk = orjson.loads(payload)
                    if _text(chunk):
                        stamps.append(time.perf_counter())
                        chunks += 1
                    if chunk.get("usage"):
                        result.tokens = chunk["usage"].get("completion_tokens") or 0
                        result.prompt_tokens = chunk["usage"].get("prompt_tokens")
                    if "error" in chunk and result.error is None:
                        result.error = "stream"
                        result.detail = orjson.dumps(chunk["error"])[:300].decode()
                if result.error is None and not done:
                    result.error = "dropped"
                    result.detail = "the stream ended without data: [DONE]"
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
        result.error, result.detail = "dropped", repr(exc)[:300]
    except TimeoutError as exc:  # before ClientError: aiohttp's timeouts are both
        result.error, result.detail = "timeout", repr(exc)[:300]
    except aiohttp.ClientError as exc:
        result.error, result.detail = "connection", repr(exc)[:300]
    except ValueError as exc:  # a line that is not JSON, or one longer than aiohttp reads
        result.error, result.detail = "protocol", repr(exc)[:300]
    end = time.perf_counter()
    result.e2e_s = end - start
    result.tokens = result.tokens or chunks
    if stamps:
        result.ttft_s = stamps[0] - start
        result.itl_s = [b - a for a, b in itertools.pairwise(stamps)]
    elif result.error is None:
        result.error, result.detail = "stream", "no text in the stream"
    return result


async def run_closed_loop(
    session: aiohttp.ClientSession,
    target: str,
    url: str,
    model: str,
    jobs: Sequence[Job],
    concurrency: int,
    *,
    endpoint: Endpoint = "completions",
    on_done: Callable[[Result], None] | None = None,
) -> LoadRun:
    """``concurrency`` clients, each sending its next job as soon as the previous one ends."""
    pending = list(reversed(jobs))
    run = LoadRun(target, concurrency, 0.0)
    start = time.perf_counter()

    async def client() -> None:
        while pending:
            job = pending.pop()
            result = await one_request(session, url, model, job, endpoint=endpoint, t0=start)
            run.results.append(result)
            if on_done is not None:
                on_done(result)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    run.seconds = time.perf_counter() - start
    return run


async def run_open_loop(
    session: aiohttp.ClientSession,
    target: str,
    url: str,
    model: str,
    jobs: Sequence[Job],
    arrivals: Sequence[float],
    *,
    rate: float | None = None,
    endpoint: Endpoint = "completions",
    on_done: Callable[[Result], None] | None = None,
) -> LoadRun:
    """Job ``i`` is sent at ``arrivals[i]`` seconds from the start, whether or not the earlier
    ones have finished. ``seconds`` runs from the start to the last completion."""
    run = LoadRun(target, 0, 0.0, rate=rate)
    start = time.perf_counter()

    async def send(job: Job, due: float) -> None:
        result = await one_request(session, url, model, job, endpoint=endpoint, t0=start)
        result.scheduled_s = due
        run.results.append(result)
        if on_done is not None:
            on_done(result)

    tasks = []
    for job, due in zip(jobs, arrivals, strict=True):
        delay = start + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(job, due)))
    await asyncio.gather(*tasks)
    run.seconds = time.perf_counter() - start
    return run


async def wait_ready(
    session: aiohttp.ClientSession, url: str, path: str, limit_s: float = 600
) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            async with session.get(url + path) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(1)
    raise TimeoutError(f"{url} did not become ready")
