"""Graceful drain on SIGTERM, against the real ``llmserve serve`` process (DrainingServer).

"sim" emits 20 tokens/s, so a 40-token stream runs ~2 s and a 1000-token one ~50 s.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from tests.scheduling.helpers import (
    StreamResult,
    assert_overloaded,
    completion,
    stream_request,
)
from tests.support.eventually import eventually, until
from tests.support.gateway import ServerProcess, gateway_process

PATH = "/v1/completions"
STARTUP_S = 30.0

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def llmserve(
    tmp_path: Path, drain_timeout_s: float, max_in_flight: int = 64
) -> AsyncIterator[tuple[ServerProcess, str]]:
    """``python -m llmserve serve`` on a free port, up and ready; killed if a test leaves it."""
    config = (
        "log_level: warning\n"
        # API keys are not what these tests are about (tests/auth covers them).
        "auth:\n"
        "  enabled: false\n"
        f"cache_dir: {tmp_path / 'cache'}\n"
        f"drain_timeout_s: {drain_timeout_s}\n"
        "models:\n"
        "  - engine: simulated\n"
        "    name: sim\n"
        "    tokens_per_second: 20\n"
        "    first_token_latency_s: 0.05\n"
        "    admission:\n"
        f"      max_in_flight: {max_in_flight}\n"
    )
    process = gateway_process(tmp_path / "llmserve.yaml", config)
    await process.start(within_s=STARTUP_S)
    try:
        yield process, process.url
    finally:
        await process.stop(sig=signal.SIGKILL)


async def open_streams(
    client: httpx.AsyncClient, count: int, max_tokens: int
) -> list[asyncio.Task[StreamResult]]:
    """Start ``count`` streams and return once each has had its first data frame."""
    firsts = [asyncio.Event() for _ in range(count)]
    body = completion("sim", max_tokens, stream=True)
    tasks = [
        asyncio.create_task(stream_request(client, PATH, body, on_first_data=first))
        for first in firsts
    ]

    def started() -> bool:
        if all(first.is_set() for first in firsts):
            return True
        for task in tasks:
            if task.done():  # ended before its first token: refused, or broken
                result = task.result()
                raise AssertionError(f"a stream ended early: {result.status} {result.body!r}")
        return False

    await eventually(started, 10.0, "the streams to start", interval=0.02)
    return tasks


async def until_draining(client: httpx.AsyncClient) -> httpx.Response:
    """/ready turns 503 at once on SIGTERM, while the process still answers."""

    async def draining() -> httpx.Response | None:
        ready = await client.get("/ready")
        return ready if ready.status_code == 503 else None

    return await until(draining, 1.0, "/ready to say 503", interval=0.05)


def exited_by_sigterm_or_cleanly(code: int | None) -> bool:
    # uvicorn re-raises the signal it shut down for, so a drained server dies "by" SIGTERM.
    return code in (0, -signal.SIGTERM)


async def test_sigterm_drains_running_and_queued_requests_then_exits(tmp_path: Path) -> None:
    drain_timeout_s = 10.0
    # Three slots: the three streams run, and one more request waits for a slot.
    async with llmserve(tmp_path, drain_timeout_s, max_in_flight=3) as (process, url):
        async with httpx.AsyncClient(base_url=url, timeout=15) as client:
            streams = await open_streams(client, 3, 40)
            queued = asyncio.create_task(client.post(PATH, json=completion("sim", 5)))
            await asyncio.sleep(0.5)  # it reaches the server's queue
            assert not queued.done()
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()

            async with httpx.AsyncClient(base_url=url, timeout=5) as probe:
                # Readiness fails at once, while the process still answers.
                ready = await until_draining(probe)
                assert ready.json()["status"] == "draining"
                # Liveness stays green: a draining process must not be restarted for it.
                assert (await probe.get("/health")).status_code == 200
                # New work is turned away with a retryable 503, streaming or not.
                assert_overloaded(await probe.post(PATH, json=completion("sim", 5)), "draining")
                refused = await stream_request(probe, PATH, completion("sim", 5, stream=True))
                assert_overloaded(refused, "draining")
            assert not any(stream.done() for stream in streams)  # all this during the drain

            results = await asyncio.gather(*streams)
            waited = await queued
            waited_done = time.monotonic()

        # Every stream that was running finished in full...
        for result in results:
            assert result.status == 200
            assert result.error is None
            assert result.token_chunks == 40
            assert result.chunks[-1]["choices"][0]["finish_reason"] == "length"
            assert result.done
        # ...and so did the request that was waiting for a slot when the signal came.
        assert waited.status_code == 200, waited.text
        assert waited.json()["usage"]["completion_tokens"] == 5
        assert waited_done >= min(r.ended for r in results)  # it did wait for a slot
        code = await process.wait(drain_timeout_s)
        exited = time.monotonic()
        assert exited - signalled < drain_timeout_s
        # It waited for all of them, not for the drain timeout.
        assert exited >= max([*(r.ended for r in results), waited_done]) - 0.05
        assert exited_by_sigterm_or_cleanly(code), (code, process.log_text(4000))


async def test_drain_timeout_cuts_long_streams_and_exits(tmp_path: Path) -> None:
    async with llmserve(tmp_path, 0.5) as (process, url):
        async with httpx.AsyncClient(base_url=url, timeout=15) as client:
            streams = await open_streams(client, 3, 1000)
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            # 0.5 s of drain, ~1 s of grace for the rest to be cancelled, then exit.
            results = await asyncio.wait_for(asyncio.gather(*streams), timeout=5)
            code = await process.wait(5)
            exited = time.monotonic()
        assert exited - signalled < 3.0
        assert exited_by_sigterm_or_cleanly(code), (code, process.log_text(4000))
        for result in results:
            assert result.status == 200
            assert result.ended - signalled < 3.0  # ended, did not hang
            assert 0 < result.token_chunks < 1000
            # Cut off: it must not look complete (no [DONE] without an error event before it).
            if result.done:
                assert any("error" in chunk for chunk in result.chunks), result.frames[-3:]


async def test_a_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    async with llmserve(tmp_path, 30.0) as (process, url):
        async with httpx.AsyncClient(base_url=url, timeout=15) as client:
            streams = await open_streams(client, 2, 1000)
            process.send_signal(signal.SIGTERM)
            ready = await until_draining(client)
            assert ready.json()["status"] == "draining"
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = await process.wait(5)
            exited = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*streams), timeout=5)
        assert exited - signalled < 2.0  # not the 30 s drain
        assert exited_by_sigterm_or_cleanly(code), (code, process.log_text(4000))
        for result in results:
            assert result.token_chunks < 1000
            assert result.ended - signalled < 3.0
