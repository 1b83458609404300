"""Limits shared through a real Redis: two gateway replicas with one keys file enforce one key's
limits together; Redis going away fails closed (or open, if configured); a crashed replica's
concurrency slot expires with its lease."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest

from llmserve.auth.principal import Principal
from llmserve.config import RateLimitConfig
from llmserve.limits.redis_store import RedisStore
from llmserve.limits.store import LimitStore, MemoryStore
from tests.auth.helpers import PROMPT_TOKENS, add_key, auth_settings, bearer, completion
from tests.conftest import RunningServer, free_port, serve, sim_engine
from tests.limits.helpers import RATE_HEADERS, assert_rate_limited, metric, retry_after
from tests.support.errors import assert_openai_error
from tests.support.eventually import eventually
from tests.support.redis_server import RedisServer

PATH = "/v1/completions"
EARLY_STOP = completion("sim", 100 - PROMPT_TOKENS, stop=[" quick"])


@asynccontextmanager
async def replicas(
    keys_path: Path,
    redis: RedisServer,
    on_store_error: Literal["fail_closed", "fail_open"] = "fail_closed",
) -> AsyncIterator[tuple[RunningServer, RunningServer]]:
    """Two gateways sharing one keys file and one Redis, as two replicas behind a balancer."""
    settings = auth_settings(
        keys_path,
        rate_limits=RateLimitConfig(
            store="redis", redis_url=redis.url, on_store_error=on_store_error
        ),
    )
    async with serve(settings) as first, serve(settings) as second:
        yield first, second


def clients(servers: tuple[RunningServer, ...], key: str) -> list[httpx.AsyncClient]:
    return [httpx.AsyncClient(base_url=s.url, timeout=10, headers=bearer(key)) for s in servers]


async def close_all(*open_clients: httpx.AsyncClient) -> None:
    for client in open_clients:
        await client.aclose()


# --- limits held together ----------------------------------------------------------------------


async def test_rpm_is_shared_by_both_replicas(tmp_path: Path, redis_server: RedisServer) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "five", rpm=5, tpm=100_000)
    async with replicas(path, redis_server) as servers:
        a, b = clients(servers, key)
        try:
            # Ten at once, alternating replicas: each replica alone would allow five.
            responses = await asyncio.gather(
                *(
                    client.post(PATH, json=completion())
                    for client in itertools.islice(itertools.cycle((a, b)), 10)
                )
            )
        finally:
            await close_all(a, b)
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) == 5, [r.status_code for r in responses]
    # One bucket: the five admitted saw it count down 4, 3, 2, 1, 0 between them.
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == [0, 1, 2, 3, 4]
    for response in ok:
        assert set(RATE_HEADERS) <= set(response.headers)
        assert response.headers["x-ratelimit-limit-requests"] == "5"
    for response in refused:
        assert_rate_limited(response)
        assert 11 <= retry_after(response) <= 12  # one request refills in 60/5 = 12 s
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
    engines = [sim_engine(s) for s in servers]
    assert sum(len(e.started) for e in engines) == 5


async def test_max_concurrent_holds_across_replicas(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "two", max_concurrent=2)
    async with replicas(path, redis_server) as servers:
        a, b = clients(servers, key)
        try:
            slow_a, slow_b = (sim_engine(s, "slow") for s in servers)
            # "slow" makes 10 tokens/s: ~0.25 s on replica A, ~0.75 s on replica B.
            first = asyncio.create_task(a.post(PATH, json=completion("slow", 3)))
            second = asyncio.create_task(b.post(PATH, json=completion("slow", 8)))
            await eventually(
                lambda: len(slow_a.active) == 1 and len(slow_b.active) == 1, within=3.0
            )
            for client in (a, b):
                third = await client.post(PATH, json=completion())
                assert_rate_limited(third, says="concurrent requests")
                assert retry_after(third) == 1
            assert (await first).status_code == 200
            assert not second.done()
            # A's slot is free now; B's request still holds the other one.
            admitted = await b.post(PATH, json=completion())
            assert admitted.status_code == 200, admitted.text
            assert (await second).status_code == 200
        finally:
            await close_all(a, b)


async def test_refunds_work_across_replicas(tmp_path: Path, redis_server: RedisServer) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "refunded", tpm=300)
    burst = add_key(path, "burst", tpm=300)
    async with replicas(path, redis_server) as servers:
        a, b = clients(servers, key)
        try:
            # Each reserves 100 of 300 but uses 4; the other replica sees the refund.
            for client in itertools.islice(itertools.cycle((a, b)), 10):
                response = await client.post(PATH, json=EARLY_STOP)
                assert response.status_code == 200, response.text
                assert response.json()["usage"]["total_tokens"] == PROMPT_TOKENS + 2
                assert int(response.headers["x-ratelimit-remaining-tokens"]) >= 150

            # Another key, 4 requests of 100 at once over both replicas: one bucket, 3 admitted.
            full = completion("sim", 100 - PROMPT_TOKENS)
            responses = await asyncio.gather(
                *(c.post(PATH, json=full, headers=bearer(burst)) for c in (a, b, a, b))
            )
        finally:
            await close_all(a, b)
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 429]
    (refused,) = [r for r in responses if r.status_code == 429]
    assert_openai_error(refused, 429, message_contains="tokens per minute")


# --- Redis going away --------------------------------------------------------------------------

STORE_ERRORS = "llmserve_rate_limit_store_errors_total"


async def test_redis_down_fails_closed_with_503_and_recovers(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "limited", rpm=100)
    free = add_key(path, "free")  # no limits: nothing to look up in Redis
    async with replicas(path, redis_server) as servers:
        a, b = clients(servers, key)
        try:
            assert (await a.post(PATH, json=completion())).status_code == 200
            closed_before = await metric(a, STORE_ERRORS, outcome="fail_closed")
            release_failed_before = await metric(a, STORE_ERRORS, outcome="release_failed")
            # A request running when Redis goes away still finishes; its release fails quietly.
            running = asyncio.create_task(b.post(PATH, json=completion("slow", 5)))
            await eventually(lambda: len(sim_engine(servers[1], "slow").active) == 1, within=3.0)

            redis_server.stop()
            for client in (a, b):
                started = time.monotonic()
                refused = await client.post(PATH, json=completion())
                assert time.monotonic() - started < 3
                assert_openai_error(
                    refused, 503, type="server_error", code="rate_limiter_unavailable"
                )
                assert retry_after(refused) >= 1
            assert (await running).status_code == 200

            assert await metric(a, STORE_ERRORS, outcome="fail_closed") == closed_before + 2
            assert await metric(a, STORE_ERRORS, outcome="release_failed") == (
                release_failed_before + 1
            )
            assert await metric(a, "llmserve_rate_limit_store_up") == 0
            # The refused requests never reached an engine.
            assert len(sim_engine(servers[0]).started) == 1
            assert len(sim_engine(servers[1]).started) == 0
            # A key without limits never needs the store.
            unlimited = await a.post(PATH, json=completion(), headers=bearer(free))
            assert unlimited.status_code == 200

            redis_server.start()  # back (empty, and without the scripts loaded)
            recovered = await a.post(PATH, json=completion())
            assert recovered.status_code == 200, recovered.text
            assert recovered.headers["x-ratelimit-limit-requests"] == "100"
            assert await metric(a, "llmserve_rate_limit_store_up") == 1
        finally:
            await close_all(a, b)


async def test_redis_down_fails_open_when_configured(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "limited", rpm=2)
    async with replicas(path, redis_server, on_store_error="fail_open") as servers:
        a, b = clients(servers, key)
        try:
            open_before = await metric(a, STORE_ERRORS, outcome="fail_open")
            closed_before = await metric(a, STORE_ERRORS, outcome="fail_closed")
            redis_server.stop()
            # Served, and without limits: more than the key's rpm of 2.
            for client in (a, b, a, b):
                response = await client.post(PATH, json=completion())
                assert response.status_code == 200, response.text
                assert not any(h.startswith("x-ratelimit-") for h in response.headers)
            assert await metric(a, STORE_ERRORS, outcome="fail_open") == open_before + 4
            assert await metric(a, STORE_ERRORS, outcome="fail_closed") == closed_before
            assert await metric(a, "llmserve_rate_limit_store_up") == 0
        finally:
            await close_all(a, b)


# --- the store itself --------------------------------------------------------------------------


async def test_a_crashed_replicas_concurrency_lease_expires(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, "test:rl", lease_s=0.5, timeout_s=1.0)
    key = Principal("solo", max_concurrent=1)
    try:
        assert (await store.reserve(key, 1, "crashed")).allowed
        # The replica that held "crashed" died: it will never release it.
        refused = await store.reserve(key, 1, "next")
        assert not refused.allowed and refused.reason == "concurrency"
        await asyncio.sleep(0.6)
        assert (await store.reserve(key, 1, "next")).allowed
        assert not (await store.reserve(key, 1, "third")).allowed  # "next" holds it now
        await store.release(key, "next", 0)  # a live replica's release frees it at once
        assert (await store.reserve(key, 1, "third")).allowed
        # Lease expiry is stored on the running set's members.
        with redis_server.client() as client:
            (member,) = client.zrange("test:rl:{solo}:running", 0, -1, withscores=True)
            assert member[0] == b"third"
            assert member[1] == pytest.approx(time.time() + 0.5, abs=0.3)
    finally:
        await store.close()


async def test_an_unreachable_store_raises_rather_than_allowing() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", "x", lease_s=1, timeout_s=0.2)
    try:
        with pytest.raises(Exception):  # noqa: B017 - any connection error will do
            await store.reserve(Principal("k", rpm=1), 1, "r")
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_both_stores_apply_the_same_rules(kind: str, request: pytest.FixtureRequest) -> None:
    """The Lua script and state.py must stay in step: one scripted sequence, same answers."""
    store: LimitStore
    if kind == "memory":
        store = MemoryStore()
    else:
        redis: RedisServer = request.getfixturevalue("redis_server")
        store = RedisStore(redis.url, "parity", lease_s=60, timeout_s=1.0)
    key = Principal("parity", rpm=4, tpm=300, max_concurrent=2)
    decisions: list[Any] = []
    try:
        decisions.append(await store.reserve(key, 100, "a"))  # allowed
        decisions.append(await store.reserve(key, 100, "b"))  # allowed
        decisions.append(await store.reserve(key, 50, "c"))  # concurrency
        await store.release(key, "a", 96)  # used 4 of 100
        decisions.append(await store.reserve(key, 150, "c"))  # allowed: 196 left
        decisions.append(await store.reserve(key, 10, "d"))  # concurrency (b, c run)
        await store.release(key, "b", 0)
        await store.release(key, "c", 0)
        decisions.append(await store.reserve(key, 100, "d"))  # tokens: ~46 left
        decisions.append(await store.reserve(key, 40, "d"))  # allowed, 4th request
        await store.release(key, "d", 0)
        decisions.append(await store.reserve(key, 1, "e"))  # requests: 4 used
    finally:
        await store.close()
    assert [(d.allowed, d.reason) for d in decisions] == [
        (True, ""),
        (True, ""),
        (False, "concurrency"),
        (True, ""),
        (False, "concurrency"),
        (False, "tokens"),
        (True, ""),
        (False, "requests"),
    ]
    snapshot = decisions[-1].snapshot
    assert (snapshot.limit_requests, snapshot.remaining_requests) == (4, 0)
    assert snapshot.limit_tokens == 300
    assert snapshot.remaining_tokens is not None and 6 <= snapshot.remaining_tokens <= 10
    assert decisions[5].retry_after_s == pytest.approx((100 - 46) * 60 / 300, abs=1.0)
    assert decisions[-1].retry_after_s == pytest.approx(15.0, abs=0.5)


# A Lua script that keeps Redis busy (single-threaded: every other command waits) for ARGV[1] s,
# as a slow command, a long script or a stalled host would.
BUSY = """
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local start = now()
while now() - start < tonumber(ARGV[1]) do end
return 1
"""


@pytest.mark.parametrize("on_store_error", ["fail_closed", "fail_open"])
async def test_a_reservation_that_timed_out_does_not_hold_a_slot(
    tmp_path: Path,
    redis_server: RedisServer,
    on_store_error: Literal["fail_closed", "fail_open"],
) -> None:
    path = tmp_path / "keys.yaml"
    key = add_key(path, "one", max_concurrent=1)
    settings = auth_settings(
        path,
        rate_limits=RateLimitConfig(
            store="redis",
            redis_url=redis_server.url,
            store_timeout_s=0.2,
            on_store_error=on_store_error,
        ),
    )
    async with (
        serve(settings) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10, headers=bearer(key)) as client,
    ):
        assert (await client.post(PATH, json=completion())).status_code == 200

        def stall() -> None:
            with redis_server.client() as blocker:
                blocker.eval(BUSY, 0, 0.8)

        stalled = asyncio.create_task(asyncio.to_thread(stall))
        await asyncio.sleep(0.1)
        during = await client.post(PATH, json=completion())
        assert during.status_code == (503 if on_store_error == "fail_closed" else 200)
        await stalled
        # Redis answers again and nothing of this key is running.
        assert sum(len(sim_engine(server, m).active) for m in ("sim", "slow")) == 0
        # The reservation Redis ran after the gateway gave up on it is undone by the gateway's
        # compensating release, retried with backoff while Redis is busy: on a loaded runner it
        # can land a little after the stall ends, so the slot must come back soon, not at once.
        running = "llmserve:rl:{one}:running"
        with redis_server.client() as redis:
            await eventually(lambda: not redis.zrange(running, 0, -1), within=5.0)
        after = await client.post(PATH, json=completion())
        assert after.status_code == 200, (
            f"{after.status_code} {after.text}: a request that never ran holds the key's only "
            f"slot: {redis_server.client().zrange(running, 0, -1)}"
        )
