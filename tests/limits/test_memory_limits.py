"""Per-key limits over a real server with the in-memory store: requests and tokens per minute,
reservation and refund, concurrent requests, and the x-ratelimit-* headers."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx

from tests.auth.helpers import PROMPT_TOKENS, add_key, auth_settings, bearer, completion
from tests.conftest import serve, sim_engine
from tests.limits.helpers import (
    DURATION,
    RATE_HEADERS,
    assert_rate_limited,
    retry_after,
)
from tests.support.eventually import eventually
from tests.support.sse import parse_events

# Costs prompt + max_tokens = 100 tokens; the stop sequence ends it after 2 generated tokens.
EARLY_STOP = completion("sim", 100 - PROMPT_TOKENS, stop=[" quick"])


async def test_rpm_refuses_the_fourth_request_with_retry_after_and_headers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "three", rpm=3, tpm=10_000)
    async with (
        serve(auth_settings(path)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10, headers=bearer(key)) as client,
    ):
        ok = [
            await client.post("/v1/completions", json=completion()),
            await client.post("/v1/completions", json=completion(stream=True)),
            await client.post(
                "/v1/chat/completions",
                json={
                    "model": "sim",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 1,
                },
            ),
        ]
        for remaining, response in zip((2, 1, 0), ok, strict=True):
            assert response.status_code == 200, response.text
            assert set(RATE_HEADERS) <= set(response.headers), response.headers
            assert response.headers["x-ratelimit-limit-requests"] == "3"
            assert response.headers["x-ratelimit-remaining-requests"] == str(remaining)
            assert response.headers["x-ratelimit-limit-tokens"] == "10000"
            assert 9_900 <= int(response.headers["x-ratelimit-remaining-tokens"]) < 10_000
            assert re.fullmatch(DURATION, response.headers["x-ratelimit-reset-requests"])
            assert re.fullmatch(DURATION, response.headers["x-ratelimit-reset-tokens"])
        assert ok[1].headers["content-type"].startswith("text/event-stream")
        assert parse_events(ok[1].content)[-1].done

        for body in (completion(), completion(stream=True)):  # a refused stream is plain JSON
            refused = await client.post("/v1/completions", json=body)
            assert_rate_limited(refused, says="requests per minute")
            # One request refills in 60/3 = 20 s.
            assert 19 <= retry_after(refused) <= 20
            assert set(RATE_HEADERS) <= set(refused.headers)
            assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert len(sim_engine(server).started) == 3  # the refused ones never reached the engine


async def test_a_key_without_limits_gets_no_rate_limit_headers(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "free")
    async with (
        serve(auth_settings(path)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10, headers=bearer(key)) as client,
    ):
        for _ in range(5):
            response = await client.post("/v1/completions", json=completion())
            assert response.status_code == 200
            assert not any(h.startswith("x-ratelimit-") for h in response.headers)


async def test_refunds_admit_requests_that_finish_early(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "refunded", tpm=300)
    async with (
        serve(auth_settings(path)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10, headers=bearer(key)) as client,
    ):
        # Each reserves 100 of 300 tokens but uses 4: without the refund the 4th would be refused
        # (the bucket refills only 5 tokens a second).
        for _ in range(10):
            response = await client.post("/v1/completions", json=EARLY_STOP)
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["total_tokens"] == PROMPT_TOKENS + 2
            assert int(response.headers["x-ratelimit-remaining-tokens"]) >= 150


async def test_concurrent_reservations_cannot_overrun_tpm_and_used_tokens_are_not_refunded(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "burst", tpm=300)
    # 98 tokens at 200 tokens/s: each runs ~0.5 s, so all four overlap.
    full = completion("sim", 100 - PROMPT_TOKENS)
    async with (
        serve(auth_settings(path)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10, headers=bearer(key)) as client,
    ):
        started = time.monotonic()
        responses = await asyncio.gather(
            *(client.post("/v1/completions", json=full) for _ in range(4))
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 200, 429], [r.text for r in responses]
        (refused,) = [r for r in responses if r.status_code == 429]
        assert_rate_limited(refused, says="tokens per minute")
        assert 1 <= retry_after(refused) <= 20
        for response in responses:
            if response.status_code == 200:
                assert response.json()["usage"]["total_tokens"] == 100

        # The three used all they reserved, so nothing came back: still refused.
        assert time.monotonic() - started < 5
        again = await client.post("/v1/completions", json=full)
        assert_rate_limited(again)
        assert len(sim_engine(server).completed) == 3


async def test_a_request_costing_more_than_tpm_is_refused_outright(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "small", tpm=300)
    async with (
        serve(auth_settings(path)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10, headers=bearer(key)) as client,
    ):
        for body in (
            completion("slow", 300 - PROMPT_TOKENS + 1),  # 301 tokens
            completion("slow", 150, n=2),  # 2 + 150 x 2 = 302: n counts
        ):
            too_big = await client.post("/v1/completions", json=body)
            assert_rate_limited(too_big, code="tokens_exceed_limit", says="300")
        assert not sim_engine(server, "slow").started
        # Those refusals took nothing: a request of exactly the limit still fits.
        exact = await client.post(
            "/v1/completions", json=completion("slow", 300 - PROMPT_TOKENS, stop=[" the"])
        )
        assert exact.status_code == 200, exact.text
        assert exact.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_max_concurrent_refuses_the_third_and_admits_after_one_finishes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "two", max_concurrent=2)
    async with (
        serve(auth_settings(path)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10, headers=bearer(key)) as client,
    ):
        slow = sim_engine(server, "slow")
        # "slow" makes 10 tokens/s: ~0.25 s and ~0.75 s.
        first = asyncio.create_task(client.post("/v1/completions", json=completion("slow", 3)))
        second = asyncio.create_task(client.post("/v1/completions", json=completion("slow", 8)))
        await eventually(lambda: len(slow.active) == 2, what="two requests running", within=3.0)

        for body in (completion(), completion(stream=True)):
            third = await client.post("/v1/completions", json=body)
            assert_rate_limited(third, says="concurrent requests")
            assert retry_after(third) == 1
        assert len(sim_engine(server).started) == 0  # the refused ones never reached "sim"

        done = await first
        assert done.status_code == 200
        assert not second.done()
        admitted = await client.post("/v1/completions", json=completion())
        assert admitted.status_code == 200, admitted.text
        assert (await second).status_code == 200
