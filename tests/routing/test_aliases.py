"""Aliases: other public names for one model. A request by alias is served and answered under
the canonical name, counted under it, and queued in the same queue; /v1/models lists aliases
of models that can serve; an unknown name is a 404 that lists what is served.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from llmserve.config import AdmissionConfig, SimulatedModel
from tests.routing.helpers import (
    Deltas,
    assert_error,
    assert_full,
    closed_url,
    gateway,
    get_json,
    scrape,
    sim_replicas,
    until_in_flight,
    upstream_model,
)
from tests.support.client import call
from tests.support.eventually import eventually

CANONICAL = "rt-alias"
ALIASES = ("rt-alias-a", "rt-alias-b")


async def test_request_by_alias_is_answered_under_the_canonical_name() -> None:
    async with (
        sim_replicas(1) as (replica,),
        gateway(upstream_model(CANONICAL, [replica.url], aliases=ALIASES)) as gw,
    ):
        for route in ("chat", "completions"):
            for stream in (False, True):
                for name in (*ALIASES, CANONICAL):
                    seen = await call(gw.url, name, route=route, stream=stream, max_tokens=4)
                    assert_full(seen, 4, model=CANONICAL)


async def test_generate_accepts_an_alias() -> None:
    async with (
        sim_replicas(1) as (replica,),
        gateway(upstream_model(CANONICAL, [replica.url], aliases=ALIASES)) as gw,
        httpx.AsyncClient(base_url=gw.url, timeout=10) as client,
    ):
        body = {"model": ALIASES[0], "prompt": "Once upon a time", "max_tokens": 3}
        response = await client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    assert response.text.count('data: {"token"') == 3


async def test_metrics_count_an_alias_under_the_canonical_name() -> None:
    model, alias = "rt-alias-metrics", "rt-alias-metrics-other-name"
    async with (
        sim_replicas(1) as (replica,),
        gateway(upstream_model(model, [replica.url], aliases=(alias,))) as gw,
    ):
        metrics = await Deltas.start(gw.url)
        assert_full(await call(gw.url, alias, max_tokens=3), 3, model=model)
        assert_full(await call(gw.url, alias, stream=False, max_tokens=3), 3, model=model)
        await metrics.until("llmserve_requests_total", 2, model=model)
        snapshot = await scrape(gw.url)
    assert alias not in snapshot.label_values(), "a metric is labelled with the alias"


async def test_models_lists_aliases_of_serving_models_only() -> None:
    dead, dead_alias = "rt-alias-dead", "rt-alias-dead-other-name"
    async with (
        sim_replicas(1) as (replica,),
        gateway(
            upstream_model(CANONICAL, [replica.url], aliases=ALIASES),
            upstream_model(
                dead,
                [closed_url()],
                aliases=(dead_alias,),
                health={"interval_s": 0.2, "probe_interval_s": 0.2},
            ),
            ready=False,
        ) as gw,
    ):

        async def listed() -> dict[str, dict[str, object]]:
            status, body, _ = await get_json(gw.url, "/v1/models")
            assert status == 200, body
            return {entry["id"]: entry for entry in body["data"]}

        # Wait until health checks have run: the live model's aliases appear.
        entries: dict[str, dict[str, object]] = {}

        async def all_listed() -> bool:
            entries.clear()
            entries.update(await listed())
            return all(a in entries for a in ALIASES)

        await eventually(all_listed, 5.0, "every alias listed", 0.05)

    assert CANONICAL in entries, entries
    for alias in ALIASES:
        assert alias in entries, entries
        assert entries[alias]["root"] == CANONICAL, entries[alias]
        assert entries[alias]["object"] == "model"
    assert entries[CANONICAL].get("root", CANONICAL) == CANONICAL
    # A model with no healthy replica: its aliases are not offered.
    assert dead_alias not in entries, entries


async def test_unknown_name_is_a_404_listing_served_names() -> None:
    async with (
        sim_replicas(1) as (replica,),
        gateway(upstream_model(CANONICAL, [replica.url], aliases=ALIASES)) as gw,
    ):
        seen = await call(gw.url, "rt-alias-nope", stream=True)
    assert_error(seen, 404, "model_not_found")
    assert seen.error is not None
    assert CANONICAL in seen.error["message"], seen.error


def _queued_model(name: str, aliases: tuple[str, ...]) -> SimulatedModel:
    # One request at a time, nobody waits: a second request is a 503 queue_full at once.
    return SimulatedModel(
        engine="simulated",
        name=name,
        tokens_per_second=20,
        first_token_latency_s=0.01,
        aliases=aliases,
        admission=AdmissionConfig(max_in_flight=1, max_waiting_requests=0),
    )


@pytest.mark.parametrize("first", ["canonical", "alias"])
async def test_alias_and_canonical_name_share_one_queue(first: str) -> None:
    model, alias = f"rt-alias-queue-{first}", f"rt-alias-queue-{first}-other"
    names = (model, alias) if first == "canonical" else (alias, model)
    async with gateway(_queued_model(model, (alias,))) as gw:
        running = asyncio.create_task(call(gw.url, names[0], max_tokens=10))  # about 0.5 s
        await until_in_flight(gw.url, model, 1)
        refused = await call(gw.url, names[1], max_tokens=2)
        assert_error(refused, 503, "queue_full")
        assert_full(await running, 10, model=model)


async def test_upstream_model_alias_shares_its_queue() -> None:
    model, alias = "rt-alias-up-queue", "rt-alias-up-queue-other"
    async with (
        sim_replicas(1) as (replica,),
        gateway(
            upstream_model(
                model,
                [replica.url],
                aliases=(alias,),
                upstream="slow",
                admission=AdmissionConfig(max_in_flight=1, max_waiting_requests=0),
            )
        ) as gw,
    ):
        running = asyncio.create_task(call(gw.url, model, max_tokens=6))  # about 0.6 s
        await until_in_flight(gw.url, model, 1)
        refused = await call(gw.url, alias, max_tokens=2)
        assert_error(refused, 503, "queue_full")
        assert_full(await running, 6, model=model)
