"""Shared pieces of the routing tests (issue 7): replicas, gateways in front of them, clients
that report exactly what they saw, and /metrics lookups by model and replica.

Replicas are real llmserve servers with the simulated engine (``serve(simulated_settings())``,
model "sim" at 200 tokens/s and "slow" at 10 tokens/s), or the fake upstream of tests/support
(a misbehaviour each, health and behaviour changed at run time, restartable on its port). The
gateway is looked at only over HTTP and /metrics; which replica served a request is read from
the replicas themselves (the simulated engine's ``started`` records, the fakes' request lists).

The Prometheus counters are process-global (the replicas run in this process too), so every
test uses its own gateway model names and compares scrapes before and after.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
from pydantic import SecretStr

from llmserve.config import (
    HealthConfig,
    ModelConfig,
    RoutingConfig,
    Settings,
    UpstreamModel,
    UpstreamReplica,
)
from tests.conftest import sim_engine, simulated_settings
from tests.observability.helpers import Deltas, Scrape, scrape
from tests.support.client import Seen
from tests.support.eventually import eventually, until
from tests.support.gateway import RunningServer, free_port, serve

__all__ = ["Deltas", "Scrape", "scrape"]

# What the simulated engine emits without a seed: its word cycle from the start.
SIM_WORDS = (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ".")

# Short upstream timeouts: every failure in these tests shows within about a second.
FAST_TIMEOUTS: dict[str, float] = {
    "connect_timeout_s": 1.0,
    "first_token_timeout_s": 1.0,
    "between_tokens_timeout_s": 1.0,
}
FAILURE_KINDS = (
    "unreachable",
    "connect_timeout",
    "first_token_timeout",
    "between_tokens_timeout",
    "http_error",
    "broken_stream",
    "malformed",
)


def sim_text(tokens: int) -> str:
    """The text the simulated engine generates for ``max_tokens=tokens`` (no seed, n=1)."""
    return "".join(SIM_WORDS[i % len(SIM_WORDS)] for i in range(tokens))


# ---------------------------------------------------------------------------------------------
# Gateway configuration
# ---------------------------------------------------------------------------------------------


def upstream_model(
    name: str,
    urls: Sequence[str],
    *,
    upstream: str = "sim",
    policy: str | None = None,
    routing: dict[str, Any] | None = None,
    health: dict[str, Any] | None = None,
    api_keys: Sequence[str | None] | None = None,
    **options: Any,
) -> UpstreamModel:
    """A gateway model over these replica URLs, with short timeouts unless told otherwise.

    Active health checks default to rarely (60 s) so that they never race a test's requests;
    an ejected replica is probed every 0.2 s. No ``policy`` and no ``routing``: the default."""
    keys = list(api_keys) if api_keys is not None else [None] * len(urls)
    if policy is not None or routing is not None:
        routing_options = {**(routing or {}), **({"policy": policy} if policy else {})}
        options["routing"] = RoutingConfig(**routing_options)
    health_options = {
        "interval_s": 60.0,
        "probe_interval_s": 0.2,
        "timeout_s": 1.0,
        "eject_after_failures": 1,
        **(health or {}),
    }
    return UpstreamModel(
        engine="openai",
        name=name,
        replicas=tuple(
            UpstreamReplica(url=url, api_key=None if key is None else SecretStr(key))
            for url, key in zip(urls, keys, strict=True)
        ),
        upstream_model=upstream,
        health=HealthConfig(**health_options),
        **{**FAST_TIMEOUTS, **options},
    )


def gateway_settings(*models: ModelConfig, **overrides: Any) -> Settings:
    return Settings(models=list(models), **overrides)


@asynccontextmanager
async def gateway(
    *models: ModelConfig, ready: bool = True, **overrides: Any
) -> AsyncIterator[RunningServer]:
    """A gateway serving these models; with ``ready``, returns once /ready says 200."""
    async with serve(gateway_settings(*models, **overrides)) as running:
        if ready:
            await wait_ready(running.url)
        yield running


async def wait_ready(url: str, within_s: float = 15.0) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:

        async def ready() -> httpx.Response | None:
            response = await client.get("/ready")
            return response if response.status_code == 200 else None

        return await until(ready, within_s, f"{url} ready", interval=0.05)


async def get_json(url: str, path: str) -> tuple[int, Any, httpx.Headers]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        response = await client.get(path)
    return response.status_code, response.json(), response.headers


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


async def call_many(count: int, make: Callable[[int], Awaitable[Seen]]) -> list[Seen]:
    return list(await asyncio.gather(*(make(i) for i in range(count))))


def assert_full(seen: Seen, tokens: int, model: str | None = None) -> None:
    """The request succeeded completely with the simulated engine's text."""
    assert seen.status == 200, seen
    assert seen.error is None, seen
    assert seen.text == sim_text(tokens), seen
    assert seen.finish_reasons == ["length"], seen
    if seen.stream:
        assert seen.done, seen
    if model is not None:
        assert seen.model == model, seen


def assert_error(seen: Seen, status: int, code: str) -> None:
    """Refused before any byte: an OpenAI error body with its own status, never an SSE stream."""
    assert seen.status == status, seen
    assert seen.content_type.startswith("application/json"), seen
    assert seen.error is not None, seen
    assert seen.error["code"] == code, seen
    assert seen.text == "", seen


def assert_in_band(seen: Seen, code: str | None = None) -> None:
    """The stream had started: 200, then one error event, and nothing after it but [DONE]."""
    assert seen.status == 200, seen
    assert seen.content_type.startswith("text/event-stream"), seen
    assert seen.in_band, seen
    assert seen.error is not None, seen
    if code is not None:
        assert seen.error["code"] == code, seen
    assert seen.events_after_error == 0, seen
    assert not seen.finish_reasons, seen


# ---------------------------------------------------------------------------------------------
# Which replica served what
# ---------------------------------------------------------------------------------------------


def started_counts(replicas: Sequence[RunningServer], model: str = "sim") -> list[int]:
    return [len(sim_engine(r, model).started) for r in replicas]


def started_since(
    replicas: Sequence[RunningServer], before: Sequence[int], model: str = "sim"
) -> list[int]:
    return [now - then for now, then in zip(started_counts(replicas, model), before, strict=True)]


async def served_by(
    replicas: Sequence[RunningServer], request: Awaitable[Seen], model: str = "sim"
) -> int:
    """Run one request alone and answer the index of the replica that generated it."""
    before = started_counts(replicas, model)
    seen = await request
    assert seen.ok, seen
    grew = [i for i, n in enumerate(started_since(replicas, before, model)) if n]
    assert len(grew) == 1, f"one request started on replicas {grew}: {seen}"
    assert started_since(replicas, before, model)[grew[0]] == 1
    return grew[0]


# ---------------------------------------------------------------------------------------------
# Metrics by model and replica
# ---------------------------------------------------------------------------------------------


def replica_matches(label: str, url: str, index: int | None = None) -> bool:
    """Whether a ``replica`` label names this replica. The label's exact spelling is the
    implementation's choice: the URL, host:port, or the replica's index are all accepted."""
    host_port = url.removeprefix("http://").removeprefix("https://")
    return label in (url, host_port, url + "/") or (index is not None and label == str(index))


def replica_value(
    snapshot: Scrape, metric: str, model: str, url: str, index: int | None = None, **labels: str
) -> float | None:
    """The sum of ``metric`` samples for this model and replica (None: no such sample)."""
    wanted = {("model", model), *labels.items()}
    values = [
        value
        for (name, sample_labels), value in snapshot.samples.items()
        if name == metric
        and wanted <= sample_labels
        and replica_matches(dict(sample_labels).get("replica", ""), url, index)
    ]
    return sum(values) if values else None


def replica_labels(snapshot: Scrape, metric: str, model: str) -> set[str]:
    return {
        dict(labels).get("replica", "")
        for (name, labels), _ in snapshot.samples.items()
        if name == metric and ("model", model) in labels
    }


async def healthy_gauge(url: str, model: str, replica_url: str, index: int) -> float | None:
    return replica_value(await scrape(url), "llmserve_replica_healthy", model, replica_url, index)


async def until_gauge(
    url: str, model: str, replica_url: str, index: int, expected: float, within_s: float = 5.0
) -> float:
    """Scrape until the replica's health gauge reads ``expected``; returns how long it took."""

    async def reads() -> bool:
        return await healthy_gauge(url, model, replica_url, index) == expected

    try:
        return await eventually(reads, within_s, interval=0.05)
    except AssertionError:
        value = await healthy_gauge(url, model, replica_url, index)
        labels = replica_labels(await scrape(url), "llmserve_replica_healthy", model)
        raise AssertionError(
            f"llmserve_replica_healthy for {model}/{replica_url} is {value}, not {expected}, "
            f"after {within_s} s; labels: {labels}"
        ) from None


async def until_in_flight(url: str, model: str, expected: float, within_s: float = 3.0) -> None:
    """Scrape until the gateway says ``expected`` requests of ``model`` run on its engine."""

    async def reached() -> bool:
        return (await scrape(url)).value("llmserve_requests_in_flight", model=model) == expected

    await eventually(reached, within_s, f"{model}: in flight reaching {expected}", interval=0.02)


# ---------------------------------------------------------------------------------------------
# Upstreams
# ---------------------------------------------------------------------------------------------


@asynccontextmanager
async def sim_replicas(
    count: int, settings: Settings | None = None
) -> AsyncIterator[list[RunningServer]]:
    """``count`` llmserve replicas with the simulated engine, each on its own port."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(serve(settings or simulated_settings()))
            for _ in range(count)
        ]


def closed_url() -> str:
    """A loopback URL where nothing listens: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"
