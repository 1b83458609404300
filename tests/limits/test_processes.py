"""Two llmserve PROCESSES sharing one real Redis, and a disconnect storm: what the issue's
verification asks for, beyond the in-process replicas of test_redis.py."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest

from llmserve.config import RateLimitConfig
from tests.auth.helpers import add_key, auth_settings, bearer, completion
from tests.conftest import sim_engine
from tests.support.eventually import eventually
from tests.support.gateway import gateway_process, serve
from tests.support.redis_server import RedisServer


async def test_two_processes_admit_exactly_the_limit(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    key = add_key(keys, "burst", rpm=6)
    config = tmp_path / "llmserve.yaml"
    config.write_text(
        "log_level: warning\n"
        f"auth: {{enabled: true, keys_file: {keys}}}\n"
        f"rate_limits: {{store: redis, redis_url: '{redis_server.url}'}}\n"
        "models:\n  - {engine: simulated, name: sim, tokens_per_second: 500,"
        " first_token_latency_s: 0.0}\n"
    )
    async with (
        gateway_process(config, log=tmp_path / "one.log") as one,
        gateway_process(config, log=tmp_path / "two.log") as two,
        httpx.AsyncClient(timeout=10, headers=bearer(key)) as client,
    ):
        burst = await asyncio.gather(
            *(
                client.post(f"{(one, two)[i % 2].url}/v1/completions", json=completion())
                for i in range(20)
            )
        )
    codes = [r.status_code for r in burst]
    assert codes.count(200) == 6, codes  # never more than the limit, across both processes
    assert codes.count(429) == 14, codes
    assert {r.status_code for r in burst} <= {200, 429}


async def test_disconnect_storm_leaves_no_slot_or_reservation(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    keys = tmp_path / "keys.yaml"
    key = add_key(keys, "storm", max_concurrent=40, tpm=1_000_000)
    settings = auth_settings(
        keys, rate_limits=RateLimitConfig(store="redis", redis_url=redis_server.url)
    )
    rng = random.Random(3)
    async with serve(settings) as server:

        async def flaky_client() -> None:
            body = completion("slow", max_tokens=50, stream=True)
            async with (
                httpx.AsyncClient(base_url=server.url, timeout=10, headers=bearer(key)) as http,
                http.stream("POST", "/v1/completions", json=body) as response,
            ):
                lines = 0
                async for _ in response.aiter_lines():
                    lines += 1
                    if lines >= rng.randint(1, 12):
                        break  # drop the connection mid-stream

        await asyncio.gather(*(flaky_client() for _ in range(40)))
        engine = sim_engine(server, "slow")
        await eventually(lambda: not engine.active, 5.0, "the streams to end on the engine")
        admission = server.models.admission("slow")
        assert (admission.in_flight, admission.queued, admission.state.waiting_tokens) == (0, 0, 0)
        running = redis_server.client().zcard("llmserve:rl:{storm}:running")
        assert running == 0  # no concurrency slot left held in Redis
        # Every token reservation was refunded down to what was really used: the bucket is
        # back near full (the prompts and the few generated tokens are all that was spent).
        level = float(redis_server.client().hget("llmserve:rl:{storm}:tokens", "level") or 0)
        assert level > 1_000_000 - 40 * 20
        async with httpx.AsyncClient(base_url=server.url, timeout=10, headers=bearer(key)) as http:
            again = await asyncio.gather(
                *(http.post("/v1/completions", json=completion()) for _ in range(40))
            )
        assert [r.status_code for r in again] == [200] * 40


@pytest.mark.parametrize("param", ["api_key", "key", "access_token"])
async def test_a_key_in_the_query_string_is_not_accepted(tmp_path: Path, param: str) -> None:
    keys = tmp_path / "keys.yaml"
    key = add_key(keys, "query")
    async with serve(auth_settings(keys)) as server, httpx.AsyncClient(base_url=server.url) as http:
        response = await http.post(f"/v1/completions?{param}={key}", json=completion())
    assert response.status_code == 401
    assert key not in response.text
