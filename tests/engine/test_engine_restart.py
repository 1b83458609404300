"""The in-process vLLM engine core process killed: the requests on it end with a clear error,
readiness says so, the engine comes back on its own, and the gateway serves again.

Its own gateway (loads vLLM twice: ≈1-2 min on 2 cores), so the shared one in
test_vllm_engine.py is never broken.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import psutil
import pytest
import pytest_asyncio

from llmserve.config import Settings, VllmModel
from tests.conftest import RunningServer, serve
from tests.support.errors import assert_openai_error
from tests.support.eventually import eventually
from tests.support.sse import aiter_events

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]

MODEL = "smollm2-135m-instruct"


def ready(client: httpx.AsyncClient, want: bool = True) -> Callable[[], Awaitable[bool]]:
    """Whether /ready says ``want`` (ready, or not)."""

    async def says() -> bool:
        return ((await client.get("/ready")).status_code == 200) == want

    return says


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway() -> AsyncIterator[RunningServer]:
    settings = Settings(models=[VllmModel(engine_args={"max_model_len": 1024})])
    async with serve(settings) as running:
        async with httpx.AsyncClient(base_url=running.url) as client:
            await eventually(ready(client), 400, "the vLLM engine ready", 0.5)
        yield running


def engine_core() -> psutil.Process:
    """vLLM's engine core: the child process of this one that holds the model."""
    children = psutil.Process(os.getpid()).children(recursive=True)
    named = [p for p in children if "EngineCore" in " ".join([p.name(), *p.cmdline()])]
    candidates = named or children
    assert candidates, "no engine core process found"
    return max(candidates, key=lambda p: p.memory_info().rss)


async def metric(client: httpx.AsyncClient, line_start: str) -> float:
    text = (await client.get("/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)
    )


async def test_a_killed_engine_core_is_replaced_and_serving_resumes(
    gateway: RunningServer,
) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1000, "stream": True}
    body["ignore_eos"] = True
    restarts = 'llmserve_engine_restarts_total{model="smollm2-135m-instruct",replica="in-process"}'
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
        before = await metric(client, restarts)
        core = engine_core()
        async with client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = aiter_events(response)
            seen = 0
            async for _ in events:
                seen += 1
                if seen >= 3:
                    break
            core.send_signal(signal.SIGKILL)
            rest = [event async for event in events]
        # The stream in flight ends in band, with the engine's error, then [DONE].
        errors = [e for e in rest if not e.done and "error" in e.json()]
        assert len(errors) == 1, rest
        assert_openai_error(errors[0].json())
        assert rest[-1].done, rest

        # Readiness tells the truth while the engine is down, and new requests get a clear 503.
        await eventually(ready(client, False), 30, "/ready not 200 with the engine core dead", 0.2)
        refused = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3}
        )
        error = assert_openai_error(refused, 503)
        assert error["code"] in {"engine_restarting", "engine_unavailable"}

        # It comes back by itself, and serves.
        await eventually(ready(client), 400, "the vLLM engine ready again", 0.5)
        again = await client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3}
        )
        assert again.status_code == 200, again.text
        assert again.json()["usage"]["completion_tokens"] == 3
        assert await metric(client, restarts) == before + 1
        assert not core.is_running() or core.status() == psutil.STATUS_ZOMBIE
