"""A small async load generator over the OpenAI completions API (streaming), shared by the
benchmarks: per-request TTFT, end-to-end latency and output tokens."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson


@dataclass(frozen=True, slots=True)
class Job:
    prompt: str
    max_tokens: int


@dataclass(slots=True)
class Result:
    tokens: int
    ttft_s: float
    e2e_s: float
    status: int = 200


@dataclass(slots=True)
class LoadRun:
    target: str
    concurrency: int
    seconds: float
    results: list[Result] = field(default_factory=list)

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.status == 200]

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens for r in self.ok) / self.seconds

    def pct(self, attr: str, q: float) -> float:
        values = sorted(getattr(r, attr) for r in self.ok)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(q * len(values)))]

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.ok)


async def one_request(session: aiohttp.ClientSession, url: str, model: str, job: Job) -> Result:
    body = {
        "model": model,
        "prompt": job.prompt,
        "max_tokens": job.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    tokens = 0
    async with session.post(url + "/v1/completions", json=body) as response:
        if response.status != 200:
            await response.read()
            return Result(0, 0.0, time.perf_counter() - start, response.status)
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = orjson.loads(line[5:])
            if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return Result(tokens, ttft or 0.0, time.perf_counter() - start)


async def run_closed_loop(
    session: aiohttp.ClientSession,
    target: str,
    url: str,
    model: str,
    jobs: Sequence[Job],
    concurrency: int,
) -> LoadRun:
    """``concurrency`` clients, each sending its next job as soon as the previous one ends."""
    pending = list(reversed(jobs))
    run = LoadRun(target, concurrency, 0.0)

    async def client() -> None:
        while pending:
            job = pending.pop()
            run.results.append(await one_request(session, url, model, job))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
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
