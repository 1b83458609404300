"""Failover: a request that fails before its first token is retried once on another replica;
after its first token it is never retried (the client would see duplicated text) and ends with
an in-band error. Every upstream timeout has its own error code and failure metric.

Bad replicas are the fake upstreams of tests/support (a fixed misbehaviour each) or
real replicas taken down after the gateway saw them healthy. When a test needs a request to hit
the bad replica, it sends several at once: least-outstanding spreads concurrent requests over
both replicas, so at least one meets the bad one whatever the tie-break.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable
from contextlib import AsyncExitStack

import httpx
import pytest

from tests.conftest import free_port, serve, sim_engine, simulated_settings
from tests.routing.helpers import (
    Deltas,
    assert_error,
    assert_full,
    assert_in_band,
    call_many,
    closed_url,
    gateway,
    healthy_gauge,
    replica_labels,
    replica_value,
    sim_replicas,
    sim_text,
    started_counts,
    started_since,
    upstream_model,
)
from tests.support.client import Seen, call
from tests.support.eventually import eventually
from tests.support.fake_upstream import (
    ERROR_JSON,
    HANG_AFTER_HEADERS,
    HANG_BEFORE_HEADERS,
    FakeUpstream,
    answer,
    chat_chunk,
    sse_frames,
)
from tests.support.sse import aiter_events

FIRST_TOKEN_TIMEOUT_S = 1.0  # FAST_TIMEOUTS in helpers: every gateway here uses it


# ---------------------------------------------------------------------------------------------
# Misbehaviours
# ---------------------------------------------------------------------------------------------


error_500 = ERROR_JSON
reject_400 = answer(
    {
        "error": {
            "message": "This model's maximum context length is 8 tokens",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    },
    400,
)
hang_before_headers = HANG_BEFORE_HEADERS
hang_after_headers = HANG_AFTER_HEADERS
garbage_first = sse_frames(b"data: {not json at all\n\n", ending="hang")
DROPPED_WORDS = (" one", " two", " three")
# Spaced out as a real server's tokens are, then the connection drops mid-body.
drop_mid_stream = sse_frames(
    *(chat_chunk(word) for word in DROPPED_WORDS), interval_s=0.05, ending="close"
)
hang_between_tokens = sse_frames(chat_chunk(" one"), chat_chunk(" two"), ending="hang")


# ---------------------------------------------------------------------------------------------
# Before the first token: retried once on another replica
# ---------------------------------------------------------------------------------------------

BEFORE_FIRST_TOKEN = {
    # name: (misbehaviour, failure kind)
    "500": (error_500, "http_error"),
    "hang-before-headers": (hang_before_headers, "first_token_timeout"),
    "hang-after-headers": (hang_after_headers, "first_token_timeout"),
    "malformed": (garbage_first, "malformed"),
}


@pytest.mark.parametrize(
    ("case", "stream"),
    [
        ("500", False),
        ("500", True),
        ("hang-after-headers", False),
        ("hang-after-headers", True),
        ("hang-before-headers", True),
        ("malformed", True),
    ],
    ids=lambda value: {False: "whole", True: "stream"}.get(value, value),
)
async def test_failure_before_the_first_token_fails_over(case: str, stream: bool) -> None:
    behave, kind = BEFORE_FIRST_TOKEN[case]
    model = f"rt-fo-{case}"
    async with (
        FakeUpstream(behave) as bad,
        sim_replicas(1) as (good,),
        gateway(upstream_model(model, [bad.url, good.url])) as gw,
    ):
        metrics = await Deltas.start(gw.url)
        before = started_counts([good])
        seen = await call_many(4, lambda _: call(gw.url, model, stream=stream, max_tokens=5))
        await metrics.after()
        on_good = started_since([good], before)[0]

    for s in seen:
        assert_full(s, 5, model=model)
        # A hang costs the first-token timeout once, then the good replica answers.
        assert s.elapsed_s < FIRST_TOKEN_TIMEOUT_S + 1.5, s
    tried_bad = len(bad.requests)
    assert tried_bad >= 1, "no request went to the bad replica: the test proves nothing"
    assert on_good == 4  # every request ended on the good replica, once
    assert metrics("llmserve_failovers_total", model=model) == tried_bad
    assert metrics("llmserve_upstream_failures_total", model=model, kind=kind) == tried_bad
    assert metrics("llmserve_upstream_failures_total", model=model) == tried_bad


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_replica_that_went_away_fails_over_as_unreachable(stream: bool) -> None:
    """The gateway saw the replica healthy; then its port refuses connections."""
    model = f"rt-fo-gone-{stream}"
    async with AsyncExitStack() as doomed, sim_replicas(1) as (good,):
        gone = await doomed.enter_async_context(serve(simulated_settings()))
        async with gateway(upstream_model(model, [gone.url, good.url])) as gw:
            await doomed.aclose()  # the replica dies between health checks (every 60 s here)
            metrics = await Deltas.start(gw.url)
            seen = await call_many(4, lambda _: call(gw.url, model, stream=stream, max_tokens=5))
            await metrics.after()

    for s in seen:
        assert_full(s, 5, model=model)
    failovers = metrics("llmserve_failovers_total", model=model)
    assert failovers >= 1, "no request went to the dead replica: the test proves nothing"
    assert metrics("llmserve_upstream_failures_total", model=model, kind="unreachable") == failovers


async def test_replica_that_stops_accepting_connections_fails_over_as_connect_timeout() -> None:
    """The replica's port still listens but accepts nothing more (a full accept queue: new
    connections hang in SYN), as a wedged host does. The connect timeout ends each try."""
    model = "rt-fo-connect"
    port = free_port()
    async with AsyncExitStack() as first_life, sim_replicas(1) as (good,):
        await first_life.enter_async_context(serve(simulated_settings(), port))
        wedged = f"http://127.0.0.1:{port}"
        # Shorter than the first-token timeout (1 s), so the two cannot be confused.
        async with gateway(upstream_model(model, [wedged, good.url], connect_timeout_s=0.5)) as gw:
            await first_life.aclose()
            with socket.socket() as blackhole, socket.socket() as filler:
                blackhole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                blackhole.bind(("127.0.0.1", port))
                blackhole.listen(0)
                filler.connect(("127.0.0.1", port))  # fills the queue; it is never accepted
                metrics = await Deltas.start(gw.url)
                seen = await call_many(4, lambda _: call(gw.url, model, max_tokens=5))
                await metrics.after()

    for s in seen:
        assert_full(s, 5, model=model)
        assert s.elapsed_s < 0.5 + 1.5, s
    failovers = metrics("llmserve_failovers_total", model=model)
    assert failovers >= 1, "no request went to the wedged replica: the test proves nothing"
    assert (
        metrics("llmserve_upstream_failures_total", model=model, kind="connect_timeout")
        == failovers
    )


async def test_replica_that_never_listened_costs_the_client_nothing() -> None:
    """A free port with nothing listening: whether active checks or a failover find it out,
    every request succeeds."""
    model = "rt-fo-closed"
    async with (
        sim_replicas(1) as (good,),
        gateway(upstream_model(model, [closed_url(), good.url])) as gw,
    ):
        for stream in (False, True, True, False):

            def one(_: int, s: bool = stream) -> Awaitable[Seen]:
                return call(gw.url, model, stream=s)

            seen = await call_many(3, one)
            for s in seen:
                assert_full(s, 5, model=model)


async def test_a_request_is_retried_once_not_more() -> None:
    """Three replicas that all answer 500: two tries, then the client gets the error."""
    model = "rt-fo-once"
    async with (
        FakeUpstream(error_500) as a,
        FakeUpstream(error_500) as b,
        FakeUpstream(error_500) as c,
        gateway(upstream_model(model, [a.url, b.url, c.url])) as gw,
    ):
        metrics = await Deltas.start(gw.url)
        seen = await call(gw.url, model, stream=True)
        await metrics.after()
        tries = [len(a.requests), len(b.requests), len(c.requests)]

    assert 500 <= seen.status < 600, seen
    assert seen.content_type.startswith("application/json"), seen
    assert seen.error is not None, seen
    assert sum(tries) == 2, f"tries per replica: {tries}"
    assert max(tries) == 1, f"retried on the same replica: {tries}"
    assert metrics("llmserve_failovers_total", model=model) == 1
    assert metrics("llmserve_upstream_failures_total", model=model, kind="http_error") == 2


async def test_every_replica_silent_is_a_504_first_token_timeout() -> None:
    """Streamed, so a 504 also proves that nothing of the stream was sent before it."""
    model = "rt-fo-silent"
    stream = True
    async with (
        FakeUpstream(hang_after_headers) as a,
        FakeUpstream(hang_before_headers) as b,
        gateway(upstream_model(model, [a.url, b.url])) as gw,
    ):
        seen = await call(gw.url, model, stream=stream)
        tries = len(a.requests) + len(b.requests)

    assert_error(seen, 504, "first_token_timeout")
    assert tries == 2
    # One first-token timeout per try, no more.
    assert FIRST_TOKEN_TIMEOUT_S * 0.9 < seen.elapsed_s < 2 * FIRST_TOKEN_TIMEOUT_S + 1.5, seen


async def wait_until_not_ready(url: str, model: str, within_s: float = 3.0) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:

        async def not_ready() -> bool:
            return (await client.get("/ready")).json()["models"].get(model) is False

        await eventually(not_ready, within_s, f"{model} no longer counted healthy", 0.05)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_every_replica_unreachable_is_503_then_no_healthy_replica(stream: bool) -> None:
    model = f"rt-fo-down-{stream}"
    async with AsyncExitStack() as doomed:
        replicas = [await doomed.enter_async_context(serve(simulated_settings())) for _ in "ab"]
        async with gateway(upstream_model(model, [r.url for r in replicas])) as gw:
            await doomed.aclose()
            first = await call(gw.url, model, stream=stream)
            # Both replicas failed: the first is out, the last one in is checked at once and
            # goes out too; from then on requests are refused at once, with Retry-After.
            await wait_until_not_ready(gw.url, model)
            second = await call(gw.url, model, stream=stream)
            other = await call(gw.url, model, stream=not stream)

    assert_error(first, 503, "upstream_unreachable")
    for s in (second, other):
        assert_error(s, 503, "no_healthy_replica")
        retry_after = s.headers.get("retry-after")
        assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1, s
        assert s.elapsed_s < 1.0, s


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_upstream_400_is_passed_on_and_not_retried(stream: bool) -> None:
    model = f"rt-fo-400-{stream}"
    async with (
        FakeUpstream(reject_400) as a,
        FakeUpstream(reject_400) as b,
        gateway(upstream_model(model, [a.url, b.url])) as gw,
    ):
        metrics = await Deltas.start(gw.url)
        seen = await call(gw.url, model, stream=stream)
        await metrics.after()
        tries = len(a.requests) + len(b.requests)

    assert seen.status == 400, seen
    assert seen.error is not None
    assert seen.error["type"] == "invalid_request_error"
    assert "maximum context length" in seen.error["message"]
    assert tries == 1
    assert metrics("llmserve_failovers_total", model=model) == 0


async def test_upstream_400_from_a_real_replica_is_not_retried() -> None:
    """Both replicas allow n=1 only; the gateway allows more. The first replica's 400 is the
    answer and nothing was generated anywhere."""
    model = "rt-fo-400-real"
    async with (
        sim_replicas(2, simulated_settings(max_n=1)) as replicas,
        gateway(upstream_model(model, [r.url for r in replicas])) as gw,
    ):
        before = started_counts(replicas)
        metrics = await Deltas.start(gw.url)
        seen = await call(gw.url, model, stream=True, n=2)
        await metrics.after()
        assert started_since(replicas, before) == [0, 0]

    assert seen.status == 400, seen
    assert seen.error is not None and "n must be at most 1" in seen.error["message"], seen
    assert metrics("llmserve_failovers_total", model=model) == 0


# ---------------------------------------------------------------------------------------------
# After the first token: never retried
# ---------------------------------------------------------------------------------------------


def _dropped_text_ok(text: str) -> bool:
    """What the client got before the drop: a prefix of the words, each at most once."""
    prefixes = {"".join(DROPPED_WORDS[:i]) for i in range(1, len(DROPPED_WORDS) + 1)}
    return text in prefixes


async def test_stream_broken_after_the_first_token_ends_in_band_without_retry() -> None:
    model = "rt-fo-drop-stream"
    async with (
        FakeUpstream(drop_mid_stream) as a,
        FakeUpstream(drop_mid_stream) as b,
        gateway(upstream_model(model, [a.url, b.url])) as gw,
    ):
        metrics = await Deltas.start(gw.url)
        seen = await call(gw.url, model, stream=True, max_tokens=8)
        await metrics.after()
        tries = len(a.requests) + len(b.requests)

    assert_in_band(seen)
    assert _dropped_text_ok(seen.text), f"duplicated or lost text: {seen.text!r}"
    assert tries == 1
    assert metrics("llmserve_failovers_total", model=model) == 0
    assert metrics("llmserve_upstream_failures_total", model=model, kind="broken_stream") == 1


async def test_whole_request_broken_after_the_first_token_is_a_502_without_retry() -> None:
    model = "rt-fo-drop-whole"
    async with (
        FakeUpstream(drop_mid_stream) as a,
        FakeUpstream(drop_mid_stream) as b,
        gateway(upstream_model(model, [a.url, b.url])) as gw,
    ):
        metrics = await Deltas.start(gw.url)
        seen = await call(gw.url, model, stream=False, max_tokens=8)
        await metrics.after()
        tries = len(a.requests) + len(b.requests)

    assert seen.status == 502, seen
    assert seen.content_type.startswith("application/json"), seen
    assert seen.error is not None and seen.text == "", seen
    assert tries == 1
    assert metrics("llmserve_failovers_total", model=model) == 0
    assert metrics("llmserve_upstream_failures_total", model=model, kind="broken_stream") == 1


async def test_stream_stalled_between_tokens_ends_with_between_tokens_timeout() -> None:
    model = "rt-fo-stall"
    async with (
        FakeUpstream(hang_between_tokens) as a,
        FakeUpstream(hang_between_tokens) as b,
        gateway(upstream_model(model, [a.url, b.url])) as gw,
    ):
        metrics = await Deltas.start(gw.url)
        seen = await call(gw.url, model, stream=True, max_tokens=8)
        await metrics.after()
        tries = len(a.requests) + len(b.requests)

    assert_in_band(seen, "between_tokens_timeout")
    assert seen.text == " one two"
    assert 0.8 < seen.elapsed_s < 2.5, seen
    assert tries == 1
    assert metrics("llmserve_failovers_total", model=model) == 0
    assert (
        metrics("llmserve_upstream_failures_total", model=model, kind="between_tokens_timeout") == 1
    )


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_total_timeout_ends_a_long_generation(stream: bool) -> None:
    """total_timeout_s bounds a generation that keeps producing tokens (10 tokens/s here)."""
    model = f"rt-fo-total-{stream}"
    async with (
        sim_replicas(1) as (replica,),
        gateway(upstream_model(model, [replica.url], upstream="slow", total_timeout_s=0.6)) as gw,
    ):
        metrics = await Deltas.start(gw.url)
        seen = await call(gw.url, model, stream=stream, max_tokens=100)
        # A request that ran out of time says nothing about its replica: it stays in.
        await metrics.after()
        assert metrics("llmserve_upstream_failures_total", model=model) == 0
        assert await healthy_gauge(gw.url, model, replica.url, 0) == 1
        assert_full(await call(gw.url, model, max_tokens=2), 2, model=model)
        # The replica's generation was stopped, not left to run for ten seconds.
        engine = sim_engine(replica, "slow")
        await eventually(lambda: not engine.active, 2.0, "the generation stopped", 0.02)

    if stream:
        assert_in_band(seen, "request_timeout")
        assert seen.text, seen
    else:
        assert_error(seen, 504, "request_timeout")
    assert 0.5 < seen.elapsed_s < 2.0, seen


async def test_failures_of_different_kinds_are_counted_per_replica() -> None:
    """The failure counter's replica label tells replicas apart."""
    model = "rt-fo-labels"
    async with (
        FakeUpstream(error_500) as bad,
        sim_replicas(1) as (good,),
        gateway(upstream_model(model, [bad.url, good.url])) as gw,
    ):
        metrics = await Deltas.start(gw.url)
        await call_many(4, lambda _: call(gw.url, model))
        await metrics.after()

    tried = len(bad.requests)
    assert tried >= 1
    now = metrics.now
    label = "llmserve_upstream_failures_total"
    assert replica_value(now, label, model, bad.url, 0, kind="http_error") == tried, replica_labels(
        now, label, model
    )
    assert not replica_value(now, label, model, good.url, 1)


@pytest.mark.parametrize("when", ["before-first-token", "mid-stream"])
async def test_client_that_goes_away_is_neither_retried_nor_held_against_the_replica(
    when: str,
) -> None:
    """A client hanging up is not a replica failure: no retry elsewhere, nothing counted, the
    replica stays in."""
    model = f"rt-fo-hangup-{when}"
    behave = hang_before_headers if when == "before-first-token" else hang_between_tokens
    slow_checks = {"probe_interval_s": 30.0}  # an ejected replica would stay out
    async with (
        FakeUpstream(behave) as a,
        FakeUpstream(behave) as b,
        gateway(upstream_model(model, [a.url, b.url], health=slow_checks)) as gw,
    ):
        metrics = await Deltas.start(gw.url)
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with httpx.AsyncClient(base_url=gw.url) as client:
            if when == "before-first-token":
                with pytest.raises(httpx.ReadTimeout):
                    await client.post("/v1/chat/completions", json=body, timeout=0.3)
            else:
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    async for event in aiter_events(response):
                        if "one" in event.data:
                            break  # got the first token: hang up
        # Past the first-token and between-tokens timeouts (1 s): a retry would have happened.
        await asyncio.sleep(1.3)
        await metrics.after()
        tries = len(a.requests) + len(b.requests)
        gauges = [
            await healthy_gauge(gw.url, model, a.url, 0),
            await healthy_gauge(gw.url, model, b.url, 1),
        ]

    assert tries == 1
    assert metrics("llmserve_failovers_total", model=model) == 0
    assert metrics("llmserve_upstream_failures_total", model=model) == 0
    assert gauges == [1, 1]


async def test_a_session_pinned_to_a_dead_replica_fails_over() -> None:
    """Affinity never costs a request: when the session's replica dies, the session is served
    by another one."""
    model = "rt-fo-session"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with AsyncExitStack() as pinned_life, sim_replicas(1) as (other,):
        pinned = await pinned_life.enter_async_context(serve(simulated_settings(), port))
        async with gateway(upstream_model(model, [url, other.url], policy="session")) as gw:
            # A session id that lands on the replica about to die.
            for attempt in range(64):
                session = {"x-session-id": f"pinned-{attempt}"}
                before = started_counts([pinned, other])
                assert_full(await call(gw.url, model, headers=session, max_tokens=2), 2)
                if started_since([pinned, other], before) == [1, 0]:
                    break
            else:
                raise AssertionError("no session landed on the first replica")
            await pinned_life.aclose()
            before = started_counts([other])
            for stream in (True, False, True):
                seen = await call(gw.url, model, headers=session, stream=stream, max_tokens=2)
                assert_full(seen, 2, model=model)
            assert started_since([other], before) == [3]


# ---------------------------------------------------------------------------------------------
# A replica killed mid-run
# ---------------------------------------------------------------------------------------------


async def test_replica_killed_mid_run_loses_and_duplicates_nothing() -> None:
    """Twenty streams of three seconds over two replicas; one replica is stopped a moment in.
    Its streams end with an in-band error, the other's complete, every later request succeeds
    on the survivor, and each successful request was generated exactly once."""
    model = "rt-fo-kill"
    tokens = 30  # 3 s at the "slow" model's 10 tokens/s
    async with AsyncExitStack() as victim_stack, sim_replicas(1) as (survivor,):
        victim = await victim_stack.enter_async_context(serve(simulated_settings()))
        replicas = [victim, survivor]
        async with gateway(
            upstream_model(model, [victim.url, survivor.url], upstream="slow")
        ) as gw:
            metrics = await Deltas.start(gw.url)
            before = started_counts(replicas, "slow")
            completed_before = [len(sim_engine(r, "slow").completed) for r in replicas]
            clients = [
                asyncio.create_task(call(gw.url, model, max_tokens=tokens)) for _ in range(20)
            ]
            victim_engine = sim_engine(victim, "slow")
            survivor_engine = sim_engine(survivor, "slow")
            await eventually(
                lambda: len(victim_engine.active) + len(survivor_engine.active) == 20,
                5.0,
                "all 20 generating",
                0.02,
            )
            on_victim = len(victim_engine.active)
            on_survivor = len(survivor_engine.active)
            assert on_victim + on_survivor == 20, (on_victim, on_survivor)
            assert on_victim >= 5 and on_survivor >= 5, (on_victim, on_survivor)
            await victim_stack.aclose()  # the replica goes away mid-stream
            during = await asyncio.gather(*clients)

            survivor_before_new = len(sim_engine(survivor, "slow").started)
            after = await call_many(10, lambda _: call(gw.url, model, max_tokens=3))
            new_on_survivor = len(sim_engine(survivor, "slow").started) - survivor_before_new
            await metrics.after()

        started = started_since(replicas, before, "slow")
        completed = [
            len(sim_engine(r, "slow").completed) - c
            for r, c in zip(replicas, completed_before, strict=True)
        ]

    failed = [s for s in during if not s.ok]
    succeeded = [s for s in during if s.ok]
    # Nothing lost: every request ended with its whole text or with an error.
    for s in succeeded:
        assert_full(s, tokens, model=model)
    for s in failed:
        assert_in_band(s)
        assert sim_text(tokens).startswith(s.text), f"duplicated text: {s.text!r}"
    assert len(failed) >= 1, "no stream was cut: the victim went away too late"
    assert len(failed) <= on_victim
    assert len(succeeded) >= on_survivor
    # Nothing duplicated: each success was generated once, on one replica.
    assert completed[0] + completed[1] == len(succeeded) + len(after), (completed, len(succeeded))
    assert completed[0] == 0  # the victim finished nothing
    failovers = metrics("llmserve_failovers_total", model=model)
    total_requests = len(during) + len(after)
    assert total_requests <= sum(started) <= total_requests + failovers, (started, failovers)
    ids = [sim_engine(r, "slow").started for r in replicas]
    assert not ids[0] & ids[1]
    # After the kill, every new request succeeds on the survivor.
    for s in after:
        assert_full(s, 3, model=model)
    assert new_on_survivor == 10
