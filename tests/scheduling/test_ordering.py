"""Who goes first: fair queueing between tenants (one per bearer token), and priority classes."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx

from llmserve.scheduling.admission import Admission
from tests.conftest import serve, sim_engine
from tests.scheduling.helpers import assert_idle, completion, model, settings
from tests.support.eventually import eventually

PATH = "/v1/completions"

# --- fairness ----------------------------------------------------------------------------------

# One slot; a 12-token request takes ~0.01 + 11 x 0.01 s = ~0.12 s on the engine.
FAIR = model("fair", tokens_per_second=100, first_token_latency_s=0.01, max_in_flight=1)
FAIR_TOKENS = 12
HEAVY_REQUESTS = 30


def tenant(url: str, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        timeout=30,
        headers={"Authorization": f"Bearer {token}"},
        limits=httpx.Limits(max_connections=HEAVY_REQUESTS + 5),
    )


async def timed(client: httpx.AsyncClient) -> float:
    start = time.monotonic()
    response = await client.post(PATH, json=completion("fair", FAIR_TOKENS))
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == FAIR_TOKENS
    return time.monotonic() - start


async def test_a_flooding_tenant_does_not_starve_a_light_one() -> None:
    async with serve(settings(FAIR)) as server:
        admission = server.models.admission("fair")
        async with tenant(server.url, "heavy") as heavy, tenant(server.url, "light") as light:
            # The unqueued service time, end to end: what a request costs with nobody ahead.
            service = statistics.median([await timed(light) for _ in range(3)])
            # The bound: a light request waits for at most the heavy request in service (fair
            # queueing puts it next), with slack for a loaded machine. FIFO would make it wait
            # for the whole backlog ahead of it instead.
            bound = 3 * service

            flood = [asyncio.create_task(timed(heavy)) for _ in range(HEAVY_REQUESTS)]
            await eventually(lambda: admission.queued == HEAVY_REQUESTS - 1, within=5)
            light_waits: list[float] = []
            backlog_at_send: list[int] = []
            for _ in range(3):
                await asyncio.sleep(0.3)
                backlog_at_send.append(admission.queued)
                light_waits.append(await timed(light) - service)
            heavy_waits = sorted(latency - service for latency in await asyncio.gather(*flood))

        # Each light request arrived behind a real heavy backlog...
        assert min(backlog_at_send) >= 10, backlog_at_send
        # ...and still waited less than the bound.
        assert max(light_waits) < bound, (light_waits, bound, service)
        # The contrast: the flood's own last request waited far longer than that.
        assert heavy_waits[-1] > 5 * bound, (heavy_waits[-1], bound)
        assert_idle(admission)


# --- priority ----------------------------------------------------------------------------------

# One slot; a 100-token blocker holds it ~1 s while the others queue up behind it.
PRIO = model("prio", tokens_per_second=100, first_token_latency_s=0.01, max_in_flight=1)


async def queue_in_order(
    client: httpx.AsyncClient,
    admission: Admission,
    path: str,
    bodies: list[dict[str, Any]],
) -> list[asyncio.Task[httpx.Response]]:
    """Send each body once the one before it is queued, so queue order is send order."""
    tasks = []
    for body in bodies:
        queued = admission.queued
        tasks.append(asyncio.create_task(client.post(path, json=body)))
        await eventually(lambda n=queued: admission.queued == n + 1)
    return tasks


async def dispatch_order(priorities: list[int], path: str = PATH) -> list[int]:
    """Queue one request per priority (in this order) behind a blocker; returns the positions
    (in send order) of the requests in the order the engine ran them."""
    async with serve(settings(PRIO)) as server:
        engine = sim_engine(server, "prio")
        admission = server.models.admission("prio")
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            blocker = asyncio.create_task(client.post(PATH, json=completion("prio", 100)))
            await eventually(lambda: admission.in_flight == 1)
            bodies = [body(path, priority) for priority in priorities]
            tasks = await queue_in_order(client, admission, path, bodies)
            # Everything queued while the blocker still ran: the order is the scheduler's.
            assert admission.in_flight == 1
            assert admission.queued == len(priorities)
            responses = await asyncio.gather(blocker, *tasks)
        assert all(r.status_code == 200 for r in responses)
        ids = [r.json()["id"] for r in responses]
        # One slot, so completion order is dispatch order.
        assert engine.completed[0] == ids[0]
        assert sorted(engine.completed) == sorted(ids)
        position = {request_id: i for i, request_id in enumerate(ids[1:])}
        assert_idle(admission)
        return [position[request_id] for request_id in engine.completed[1:]]


def body(path: str, priority: int) -> dict[str, Any]:
    if path == PATH:
        return completion("prio", 3, priority=priority)
    return {
        "model": "prio",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "priority": priority,
    }


async def test_urgent_requests_dispatch_before_earlier_less_urgent_ones() -> None:
    # Three "priority": 5 requests queue first, then three "priority": 0 ones: lower runs first.
    assert await dispatch_order([5, 5, 5, 0, 0, 0]) == [3, 4, 5, 0, 1, 2]


async def test_priority_classes_keep_queue_order_within_a_class() -> None:
    assert await dispatch_order([5, 0, 5, 0, 5, 0]) == [1, 3, 5, 0, 2, 4]


async def test_a_request_cannot_raise_its_own_urgency() -> None:
    # A negative priority asks for more urgency than the (anonymous) principal's class 0: it is
    # held to class 0, so it does not jump the class-0 requests queued before it (chat route).
    assert await dispatch_order([0, 0, -5, 5], "/v1/chat/completions") == [0, 1, 2, 3]
