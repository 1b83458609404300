"""Keys and limits in front of vLLM's OpenAI layer (the real in-process engine, the embedded
model): the quota is refused before a stream's first byte, and the key's concurrency slot comes
back after a request that completed and after one whose client hung up mid-stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from llmserve.config import AdmissionConfig, VllmModel
from tests.auth.helpers import add_key, auth_settings, bearer
from tests.conftest import RunningServer, serve
from tests.routing.helpers import wait_ready
from tests.support.errors import assert_openai_error
from tests.support.eventually import until
from tests.support.sse import Comment, Event, aiter_events, aiter_sse

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]

MODEL = "smollm2-135m-instruct"
KEYS: dict[str, str] = {}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    path: Path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    KEYS["small"] = add_key(path, "small", tpm=200)
    KEYS["single"] = add_key(path, "single", max_concurrent=1)
    KEYS["free"] = add_key(path, "free")
    # One request runs at a time, so a second one queues; keep-alives every half second.
    model = VllmModel(
        engine_args={"max_model_len": 2048}, admission=AdmissionConfig(max_in_flight=1)
    )
    settings = auth_settings(path, models=[model]).model_copy(update={"keepalive_interval_s": 0.5})
    async with serve(settings) as running:
        await wait_ready(running.url, within_s=400)
        yield running


async def test_over_quota_stream_is_a_429_before_its_first_byte(
    keyed_server: RunningServer,
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello " * 100}],
        "max_tokens": 150,
        "stream": True,
    }
    async with (
        httpx.AsyncClient(base_url=keyed_server.url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body, headers=bearer(KEYS["small"])) as r,
    ):
        assert r.status_code == 429  # a status of its own: refused before the stream opened
        await r.aread()
        assert_openai_error(r, 429, type="rate_limit_error")


async def test_the_concurrency_slot_comes_back_after_a_hang_up(
    keyed_server: RunningServer,
) -> None:
    headers = bearer(KEYS["single"])
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "stream": True}
    body["ignore_eos"] = True
    async with httpx.AsyncClient(base_url=keyed_server.url, timeout=60) as http:
        async with http.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            # Held in a name: a dropped httpx line iterator is finalized, and that closes the
            # connection (a hang-up the server rightly answers by freeing the slot).
            events = aiter_events(r)
            async for _ in events:
                break
            busy = await http.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
                headers=headers,
            )
            assert busy.status_code == 429  # the one slot is held by the open stream

        async def admitted() -> httpx.Response | None:
            after = await http.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
                headers=headers,
            )
            return after if after.status_code == 200 else None

        after = await until(admitted, 30, "the slot back after the hang-up", 0.2)
        assert after.json()["usage"]["completion_tokens"] == 1


async def test_a_queued_stream_gets_keep_alives_then_its_tokens(
    keyed_server: RunningServer,
) -> None:
    """A stream that waits in the queue is opened with SSE comments at the keep-alive interval
    (a proxy with an idle timeout keeps it), then streams once admitted."""
    headers = bearer(KEYS["free"])
    long = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "stream": True}
    long["ignore_eos"] = True
    short = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "stream": True}
    async with (
        httpx.AsyncClient(base_url=keyed_server.url, timeout=120) as http,
        http.stream("POST", "/v1/completions", json=long, headers=headers) as first,
    ):
        assert first.status_code == 200
        events = aiter_events(first)  # held: a dropped iterator would hang up
        async for _ in events:
            break
        async with http.stream("POST", "/v1/completions", json=short, headers=headers) as queued:
            assert queued.status_code == 200  # opened while it waits
            waiting = aiter_sse(queued)
            comments = 0
            async for item in waiting:
                if isinstance(item, Comment):
                    comments += 1
                if comments == 3:
                    break
            # The long stream hangs up: the queued one is admitted and streams to the end.
            await first.aclose()
            data = [item async for item in waiting if isinstance(item, Event)]
    assert comments == 3
    assert data[-1].done
    assert len(data) >= 2  # tokens, then [DONE]


@pytest.mark.parametrize("stream", [False, True])
async def test_responses_go_through_the_keys_quota(
    keyed_server: RunningServer, stream: bool
) -> None:
    """The Responses API is gated as chat is: over the key's tokens per minute → 429."""
    body = {"model": MODEL, "input": "hello " * 100, "max_output_tokens": 150, "stream": stream}
    async with httpx.AsyncClient(base_url=keyed_server.url, timeout=60) as http:
        r = await http.post("/v1/responses", json=body, headers=bearer(KEYS["small"]))
        assert_openai_error(r, 429, type="rate_limit_error")
        fits = {**body, "input": "hello", "max_output_tokens": 5}
        ok = await http.post("/v1/responses", json=fits, headers=bearer(KEYS["small"]))
        assert ok.status_code == 200, ok.text
