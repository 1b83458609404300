"""Fault injection helpers: a gateway in front of a fake upstream that misbehaves on command
(tests/support/fake_upstream.py) and of a healthy second one, and what a client must see.

Everything runs on 127.0.0.1 in the test's event loop. The misbehaving upstream keeps its port
across ``stop()`` / ``start()``, so a test can take it down (connections refused), bring it back
and watch the gateway recover, as an engine restarting behind a service address would.

The tests look at the gateway only through HTTP and ``/metrics`` (not its internals, which may
change), plus what the fake upstream itself saw (how many of its handlers are still running: a
gateway that gave up on a request must also have closed the upstream connection).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from llmserve.config import Limits, Settings, UpstreamModel
from tests.observability.helpers import Scrape, scrape
from tests.support import client as sse_client
from tests.support.client import Seen
from tests.support.eventually import eventually, until
from tests.support.fake_upstream import WORDS, FakeUpstream
from tests.support.gateway import RunningServer, serve

# Model names no other test uses: the Prometheus counters are process-global, and the tests
# compare scrapes before and after on these labels.
FLAKY = "fault-flaky"
STEADY = "fault-steady"

# The error codes a client may see for each kind of upstream failure: the generic code of one
# upstream engine, or the specific one of the replica-routing engine (issue 7).
UNREACHABLE = frozenset({"engine_unavailable", "upstream_unreachable", "no_healthy_replica"})
BROKEN = frozenset({"engine_error", "upstream_broken_stream"})
MALFORMED = frozenset({"engine_error", "upstream_malformed"})
HTTP_ERROR = frozenset({"engine_error", "upstream_http_error"})
FIRST_TOKEN = frozenset({"timeout", "first_token_timeout"})
BETWEEN_TOKENS = frozenset({"timeout", "between_tokens_timeout"})
REQUEST_TIMEOUT = frozenset({"request_timeout"})


def upstreams() -> tuple[FakeUpstream, FakeUpstream]:
    """FLAKY's upstream (6 tokens 20 ms apart, healthy until told otherwise) and STEADY's (25
    tokens 30 ms apart, long enough to overlap any fault); not started."""
    return FakeUpstream(tokens=6, interval_s=0.02), FakeUpstream(tokens=25, interval_s=0.03)


# ---------------------------------------------------------------------------------------------
# The gateway in front: FLAKY is the misbehaving upstream, STEADY a healthy one
# ---------------------------------------------------------------------------------------------


def fault_settings(
    flaky: FakeUpstream,
    steady: FakeUpstream,
    *,
    keepalive_interval_s: float = 10.0,
    request_timeout_s: float = 600.0,
    **flaky_options: Any,
) -> Settings:
    options: dict[str, Any] = {
        "connect_timeout_s": 1.0,
        "first_token_timeout_s": 0.6,
        "between_tokens_timeout_s": 0.6,
        **flaky_options,
    }
    return Settings(
        models=[
            UpstreamModel(engine="openai", name=FLAKY, url=flaky.url, **options),
            UpstreamModel(engine="openai", name=STEADY, url=steady.url),
        ],
        limits=Limits(request_timeout_s=request_timeout_s),
        keepalive_interval_s=keepalive_interval_s,
    )


@dataclass
class Bench:
    gateway: RunningServer
    flaky: FakeUpstream
    steady: FakeUpstream

    @property
    def url(self) -> str:
        return self.gateway.url


@asynccontextmanager
async def fault_bench(start_flaky: bool = True, **settings: Any) -> AsyncIterator[Bench]:
    """A gateway serving FLAKY and STEADY (see ``upstreams``)."""
    flaky, steady = upstreams()
    await steady.start()
    if start_flaky:
        await flaky.start()
    try:
        async with serve(fault_settings(flaky, steady, **settings)) as gateway:
            # Engines start in the background: begin once the gateway knows where each stands.
            models = {FLAKY: start_flaky, STEADY: True}
            await ready_becomes(gateway.url, 200 if start_flaky else 503, models, within=10)
            yield Bench(gateway, flaky, steady)
    finally:
        await flaky.stop()
        await steady.stop()


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


# The fault upstreams stream up to 100 words; a request asks for 50 of them, and may take
# 20 s before the client's safety net fails the test.
call = functools.partial(sse_client.call, max_tokens=50, timeout_s=20.0)


def assert_completed(seen: Seen, tokens: int) -> None:
    """A request that succeeded completely: all its words, a finish reason, no error."""
    assert seen.status == 200, seen
    assert seen.error is None, seen
    assert seen.text == "".join(WORDS[:tokens]), seen
    assert seen.finish_reasons == ["length"], seen
    if seen.stream:
        assert seen.done, seen


def assert_error_status(seen: Seen, status: int, codes: frozenset[str]) -> None:
    """Refused before any byte: the OpenAI error body with its own status."""
    assert seen.status == status, seen
    assert seen.content_type == "application/json", seen
    assert seen.error is not None, seen
    assert seen.error["code"] in codes, seen
    assert seen.error["type"] == "server_error", seen
    assert set(seen.error) == {"message", "type", "param", "code"}, seen
    assert seen.text == "", seen


def assert_in_band_error(
    seen: Seen, codes: frozenset[str], *, after_tokens: bool = True, words: str = "".join(WORDS)
) -> None:
    """Failed after the stream opened: 200, what came before, then one error event and
    data: [DONE]; no finish reason pretends the generation ended normally."""
    assert seen.status == 200, seen
    assert seen.content_type.startswith("text/event-stream"), seen
    assert seen.in_band and seen.error is not None, seen
    assert seen.error["code"] in codes, seen
    assert seen.error["type"] == "server_error", seen
    assert seen.done, seen
    assert seen.finish_reasons == [], seen
    if after_tokens:
        assert seen.text, seen
        assert words.startswith(seen.text), seen


# ---------------------------------------------------------------------------------------------
# /metrics and /ready
# ---------------------------------------------------------------------------------------------


def statuses(s: Scrape, model: str) -> dict[str, float]:
    """llmserve_requests_total of one model, by status."""
    found: dict[str, float] = {}
    for (name, labels), value in s.samples.items():
        if name == "llmserve_requests_total" and ("model", model) in labels:
            status = dict(labels)["status"]
            found[status] = found.get(status, 0.0) + value
    return found


def rejections(s: Scrape) -> dict[str, float]:
    """llmserve_rejections_total by reason (all keys)."""
    found: dict[str, float] = {}
    for (name, labels), value in s.samples.items():
        if name == "llmserve_rejections_total":
            reason = dict(labels)["reason"]
            found[reason] = found.get(reason, 0.0) + value
    return found


def upstream_failures(s: Scrape, model: str) -> dict[str, float] | None:
    """llmserve_upstream_failures_total of one model by kind, where the gateway has that
    metric (replica routing, issue 7); None where it does not."""
    if "llmserve_upstream_failures" not in s.text:
        return None
    found: dict[str, float] = {}
    for (name, labels), value in s.samples.items():
        if name == "llmserve_upstream_failures_total" and ("model", model) in labels:
            kind = dict(labels)["kind"]
            found[kind] = found.get(kind, 0.0) + value
    return found


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    keys = set(after) | set(before)
    changed = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}
    return {k: v for k, v in changed.items() if v}


async def settled_statuses(
    url: str, before: Scrape, expected: dict[str, dict[str, float]], within: float = 5.0
) -> Scrape:
    """Scrape until every model's requests_total delta adds up to its expected count (a
    stream is recorded just after its last byte), then check the deltas by status exactly."""
    wanted = {m: sum(v.values()) for m, v in expected.items()}
    now = before

    async def added_up() -> bool:
        nonlocal now
        now = await scrape(url)
        totals = {m: sum(delta(statuses(now, m), statuses(before, m)).values()) for m in expected}
        return totals == wanted

    with contextlib.suppress(AssertionError):  # the exact check below says what differs
        await eventually(added_up, within, interval=0.02)
    for model, by_status in expected.items():
        assert delta(statuses(now, model), statuses(before, model)) == by_status, model
    return now


async def ready_becomes(
    url: str, status: int, models: dict[str, bool], within: float = 8.0
) -> dict[str, Any]:
    """Poll /ready until it answers ``status`` with these models' states. A gateway may learn
    an upstream's state from its own checks (every few seconds) and from failed requests, so
    readiness is allowed to lag the truth a little, never to stay wrong. Each answer must come
    quickly: a readiness probe has a timeout of its own."""

    async def says_so() -> dict[str, Any] | None:
        got, body, elapsed = await ready(url)
        assert elapsed < 6.0, f"/ready took {elapsed:.1f} s"
        return body if (got, body.get("models")) == (status, models) else None

    return await until(says_so, within, f"/ready {status} with {models}", interval=0.1)


async def ready(url: str) -> tuple[int, dict[str, Any], float]:
    """GET /ready: status, body, and how long it took to answer."""
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        response = await client.get("/ready")
    return response.status_code, response.json(), time.monotonic() - started


async def assert_nothing_held(url: str, *upstreams: FakeUpstream, within: float = 5.0) -> None:
    """In-flight and queue gauges back to 0 for every model, and no upstream handler still
    running (the gateway closed every upstream connection it gave up on)."""
    gauges = (
        "llmserve_requests_in_flight",
        "llmserve_queue_requests",
        "llmserve_queue_tokens",
        "llmserve_replica_requests_in_flight",  # where replica routing (issue 7) exists
    )

    async def clear() -> bool:
        s = await scrape(url)
        return all(s.value(g) == 0 for g in gauges) and all(u.open == 0 for u in upstreams)

    try:
        await eventually(clear, within, "gauges at 0 and no upstream request open")
    except AssertionError:
        s = await scrape(url)
        held = {g: s.value(g) for g in gauges}
        open_ = [u.open for u in upstreams]
        raise AssertionError(f"held: {held}, upstream open: {open_}") from None
