"""Fault injection through a real gateway: engines that die, hang, babble or refuse.

The gateway (real uvicorn on loopback) serves two upstream models: FLAKY, a fake upstream told
to misbehave, and STEADY, a healthy upstream streaming at the same time. For every fault:

- the affected requests end with a clear error: an OpenAI error body with its own status
  (502/503/504) when nothing was sent yet, or, once a stream has started, an in-band SSE error
  event followed by ``data: [DONE]``; never a hang, a 500 or a silently truncated stream;
- concurrent requests to STEADY complete in full, their tokens never stalled by the fault;
- ``llmserve_requests_total`` counts the affected requests under the right status, and
  ``llmserve_rejections_total`` counts exactly those refused before their first byte;
- ``/ready`` comes to tell the truth (what the upstream's health endpoint says) within a few
  seconds, and turns back to 200 when the upstream recovers; a later request then succeeds;
- nothing is held afterwards: in-flight and queue gauges at 0, and every upstream request the
  gateway gave up on has had its connection closed (the upstream's handler was cancelled).

Then the in-process engine (the simulated one) stopped and crashing mid-stream.

Error codes are checked as families (``fault_helpers.UNREACHABLE`` ...): the generic code of a
single upstream engine, or the specific one replica routing (issue 7) gives; statuses exactly.

Also: upstream JSON of the wrong shape, a client that leaves mid-body, and a wedged upstream
at start-up (which must not hold back the other models).

Run: ``.venv/bin/pytest tests/reliability/test_faults.py -q -x -p no:cacheprovider``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import pytest

from llmserve.config import AdmissionConfig, Settings, SimulatedModel
from llmserve.engines.events import EngineEvent
from llmserve.errors import EngineUnavailable
from llmserve.validation.request import ValidatedRequest
from tests.conftest import serve
from tests.observability.helpers import scrape
from tests.reliability.fault_helpers import (
    BETWEEN_TOKENS,
    BROKEN,
    FIRST_TOKEN,
    FLAKY,
    HTTP_ERROR,
    MALFORMED,
    REQUEST_TIMEOUT,
    STEADY,
    UNREACHABLE,
    Bench,
    assert_completed,
    assert_error_status,
    assert_in_band_error,
    assert_nothing_held,
    call,
    delta,
    fault_bench,
    fault_settings,
    ready,
    ready_becomes,
    rejections,
    settled_statuses,
    upstream_failures,
    upstreams,
)
from tests.support.client import Seen
from tests.support.eventually import eventually
from tests.support.fake_upstream import (
    CRASH,
    DRIP,
    DROP,
    ERROR_JSON,
    ERROR_PLAIN,
    GARBAGE_AFTER,
    GARBAGE_FIRST,
    HANG_AFTER_HEADERS,
    HANG_BEFORE_HEADERS,
    HANG_BETWEEN,
    HEALTHY,
    HTML,
    WORDS,
    Mode,
    after_words,
)

STEADY_STREAMS = 6
STEADY_TOKENS = 25  # 30 ms apart: 0.75 s, overlapping every fault below
# A healthy stream's tokens come 30 ms apart; a gateway whose event loop the fault blocked,
# or whose upstream pool it exhausted, would show a gap far above this.
MAX_STEADY_GAP_S = 0.5


@dataclass(frozen=True)
class Expect:
    """How a request ends: ``status`` before any byte, or (``status`` None) in-band."""

    codes: frozenset[str]
    status: int | None = None
    after_tokens: bool = True  # for in-band errors: some tokens came first


@dataclass(frozen=True)
class Fault:
    mode: Mode
    stream: Expect
    whole: Expect
    # llmserve_requests_total{status} of the affected requests.
    status: str
    # llmserve_upstream_failures_total{kind} (None: a deadline, not the upstream's fault).
    kind: str | None = None
    # What the upstream's /health answers meanwhile (and so what /ready must say).
    health: int = 200
    settings: dict[str, Any] = field(default_factory=dict)


FAULTS = {
    "dies-mid-stream": Fault(
        DROP,
        stream=Expect(BROKEN),
        whole=Expect(BROKEN, 502),
        kind="broken_stream",
        status="engine_error",
    ),
    "hangs-before-headers": Fault(
        HANG_BEFORE_HEADERS,
        stream=Expect(FIRST_TOKEN, 504),
        whole=Expect(FIRST_TOKEN, 504),
        kind="first_token_timeout",
        status="timeout",
    ),
    "hangs-before-first-token": Fault(
        HANG_AFTER_HEADERS,
        stream=Expect(FIRST_TOKEN, 504),
        whole=Expect(FIRST_TOKEN, 504),
        kind="first_token_timeout",
        status="timeout",
    ),
    # The stream was opened for keep-alives (0.2 s) before the first-token timeout (0.8 s):
    # the timeout can only arrive in-band, after keep-alive comments and no token.
    "hangs-past-the-keepalive": Fault(
        HANG_AFTER_HEADERS,
        stream=Expect(FIRST_TOKEN, after_tokens=False),
        whole=Expect(FIRST_TOKEN, 504),
        kind="first_token_timeout",
        status="timeout",
        settings={"keepalive_interval_s": 0.2, "first_token_timeout_s": 0.8},
    ),
    "hangs-between-tokens": Fault(
        HANG_BETWEEN,
        stream=Expect(BETWEEN_TOKENS),
        whole=Expect(BETWEEN_TOKENS, 504),
        kind="between_tokens_timeout",
        status="timeout",
    ),
    # Tokens keep coming (every 0.2 s, inside the 0.6 s between-tokens timeout), forever: the
    # request's own deadline ends it.
    "drips-past-the-request-timeout": Fault(
        DRIP,
        stream=Expect(REQUEST_TIMEOUT),
        whole=Expect(REQUEST_TIMEOUT, 504),
        status="timeout",
        settings={"request_timeout_s": 1.2},
    ),
    "garbage-first": Fault(
        GARBAGE_FIRST,
        stream=Expect(MALFORMED, 502),
        whole=Expect(MALFORMED, 502),
        kind="malformed",
        status="engine_error",
    ),
    "garbage-after-tokens": Fault(
        GARBAGE_AFTER,
        stream=Expect(MALFORMED),
        whole=Expect(MALFORMED, 502),
        kind="malformed",
        status="engine_error",
    ),
    "web-page-instead-of-sse": Fault(
        HTML,
        stream=Expect(BROKEN, 502),
        whole=Expect(BROKEN, 502),
        kind="broken_stream",
        status="engine_error",
    ),
    "500-openai-body": Fault(
        ERROR_JSON,
        stream=Expect(HTTP_ERROR, 502),
        whole=Expect(HTTP_ERROR, 502),
        kind="http_error",
        status="engine_error",
        health=500,
    ),
    "500-plain-body": Fault(
        ERROR_PLAIN,
        stream=Expect(HTTP_ERROR, 502),
        whole=Expect(HTTP_ERROR, 502),
        kind="http_error",
        status="engine_error",
        health=500,
    ),
}


def check(seen: Seen, expect: Expect) -> None:
    if expect.status is not None:
        assert_error_status(seen, expect.status, expect.codes)
    else:
        assert_in_band_error(seen, expect.codes, after_tokens=expect.after_tokens)


async def steady_streams(url: str) -> list[Seen]:
    return await asyncio.gather(*(call(url, STEADY, stream=True) for _ in range(STEADY_STREAMS)))


def check_steady(seen: list[Seen]) -> None:
    """STEADY's streams were untouched by FLAKY's fault: complete, and never stalled."""
    for s in seen:
        assert_completed(s, STEADY_TOKENS)
        assert s.max_gap_s < MAX_STEADY_GAP_S, f"STEADY stalled {s.max_gap_s:.2f} s: {s}"


async def check_recovery(bench: Bench) -> None:
    """The upstream is back: /ready 200, and FLAKY serves whole and streamed requests again."""
    bench.flaky.set(HEALTHY, health=200)
    await ready_becomes(bench.url, 200, {FLAKY: True, STEADY: True})
    for stream in (True, False):
        assert_completed(await call(bench.url, FLAKY, stream=stream), bench.flaky.tokens)
    s = await scrape(bench.url)
    assert s.value("llmserve_engine_healthy", model=FLAKY) == 1


# ---------------------------------------------------------------------------------------------
# One misbehaving upstream, one healthy one, behind the same gateway
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FAULTS))
async def test_fault_fails_only_its_requests_is_counted_and_recovers(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    fault = FAULTS[name]
    async with fault_bench(**fault.settings) as bench:
        # The three requests reach the upstream before it misbehaves (see ``barrier``).
        bench.flaky.set(fault.mode, health=fault.health, barrier=3)
        before = await scrape(bench.url)

        steady, chat_stream, completion_stream, whole = await asyncio.gather(
            steady_streams(bench.url),
            call(bench.url, FLAKY, stream=True),
            call(bench.url, FLAKY, stream=True, route="completions"),
            call(bench.url, FLAKY, stream=False),
        )

        # The affected requests end clearly, each in its own way.
        check(chat_stream, fault.stream)
        check(completion_stream, fault.stream)
        check(whole, fault.whole)
        if name == "hangs-past-the-keepalive":
            assert chat_stream.keepalives >= 2, chat_stream
        for seen in (chat_stream, completion_stream, whole):
            assert seen.elapsed_s < 3.0, seen  # every timeout here is at most 1.2 s
        # Everything else is unaffected.
        check_steady(steady)

        # The right counters moved, by exactly these requests.
        after = await settled_statuses(
            bench.url,
            before,
            {FLAKY: {fault.status: 3}, STEADY: {"ok": STEADY_STREAMS}},
        )
        # What failed, by kind, where the gateway counts upstream failures (issue 7).
        failures = upstream_failures(after, FLAKY)
        if failures is not None:
            was = upstream_failures(before, FLAKY) or {}
            assert delta(failures, was) == ({fault.kind: 3.0} if fault.kind else {})
        # Refusals: those answered with an error status, none for an in-band error.
        refused = sum(e.status is not None for e in (fault.stream, fault.stream, fault.whole))
        expected = {fault.status: float(refused)} if refused else {}
        assert delta(rejections(after), rejections(before)) == expected
        # Expected failures, not gateway bugs: nothing logged as an error (tracebacks).
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []

        # /ready comes to say what the upstream says about itself.
        healthy = fault.health == 200
        await ready_becomes(bench.url, 200 if healthy else 503, {FLAKY: healthy, STEADY: True})
        s = await scrape(bench.url)
        assert s.value("llmserve_engine_healthy", model=FLAKY) == (1 if healthy else 0)

        # Nothing held: no slot, no queue entry, no upstream connection left open.
        await assert_nothing_held(bench.url, bench.flaky, bench.steady)
        await check_recovery(bench)
        await assert_nothing_held(bench.url, bench.flaky, bench.steady)


async def test_hung_upstream_saturating_its_slots_still_ends_every_request() -> None:
    """Twelve requests to a hung upstream allowed 4 at a time: 4 run, 8 wait in the gateway's
    queue. Each running one times out, which must free its slot for the next, so all twelve
    end within three rounds of the first-token timeout (a slot kept by a timed-out request
    would leave the rest waiting for the 60 s queue timeout): 504, or 503 at once where the
    gateway took the upstream out of rotation after the first timeouts. STEADY meanwhile is
    untouched."""
    async with fault_bench(admission=AdmissionConfig(max_in_flight=4)) as bench:
        bench.flaky.set(HANG_AFTER_HEADERS)
        before = await scrape(bench.url)
        steady, hung = await asyncio.gather(
            steady_streams(bench.url),
            asyncio.gather(*(call(bench.url, FLAKY, stream=i % 2 == 0) for i in range(12))),
        )
        for seen in hung:
            if seen.status == 503:
                assert_error_status(seen, 503, UNREACHABLE)
            else:
                assert_error_status(seen, 504, FIRST_TOKEN)
            assert seen.elapsed_s < 4.0, seen  # three rounds of 0.6 s, not a queue timeout
        timed_out = sum(seen.status == 504 for seen in hung)
        assert timed_out >= 4 and bench.flaky.received == timed_out
        check_steady(steady)
        by_status = {"timeout": timed_out, "engine_error": 12 - timed_out}
        await settled_statuses(
            bench.url,
            before,
            {FLAKY: {k: v for k, v in by_status.items() if v}, STEADY: {"ok": STEADY_STREAMS}},
        )
        await assert_nothing_held(bench.url, bench.flaky, bench.steady)
        await check_recovery(bench)


# ---------------------------------------------------------------------------------------------
# The upstream process dies and comes back
# ---------------------------------------------------------------------------------------------


async def test_upstream_crash_mid_stream_then_refused_then_restarted() -> None:
    """The upstream server dies with two requests mid-stream (connections reset, port
    closed): the stream gets an in-band error, the whole request a 502. While it is down,
    /ready is 503 naming it, and its requests get 503 at once (STEADY still serves). When it
    comes back on the same address, the gateway recovers without a restart."""
    async with fault_bench() as bench:
        bench.flaky.set(CRASH)
        before = await scrape(bench.url)

        async def crash_when_both_mid_stream() -> None:
            await eventually(lambda: bench.flaky.hanging == 2, 5, "both mid-stream")
            await bench.flaky.stop()

        steady, stream, whole, _ = await asyncio.gather(
            steady_streams(bench.url),
            call(bench.url, FLAKY, stream=True),
            call(bench.url, FLAKY, stream=False),
            crash_when_both_mid_stream(),
        )
        assert_in_band_error(stream, BROKEN)
        assert stream.text == "".join(WORDS[:3])  # what was sent before the crash arrived
        assert_error_status(whole, 502, BROKEN)
        check_steady(steady)

        # Down: refused connections.
        await ready_becomes(bench.url, 503, {FLAKY: False, STEADY: True})
        down_stream, down_whole, steady_meanwhile = await asyncio.gather(
            call(bench.url, FLAKY, stream=True),
            call(bench.url, FLAKY, stream=False),
            call(bench.url, STEADY, stream=True),
        )
        for seen in (down_stream, down_whole):
            assert_error_status(seen, 503, UNREACHABLE)
            assert seen.elapsed_s < 2.0, seen  # refused at once, not after a timeout
        assert_completed(steady_meanwhile, STEADY_TOKENS)

        after = await settled_statuses(
            bench.url,
            before,
            {FLAKY: {"engine_error": 4}, STEADY: {"ok": STEADY_STREAMS + 1}},
        )
        # The 502 and the two 503s were refused before their first byte; the stream was not.
        assert delta(rejections(after), rejections(before)) == {"engine_error": 3}
        failures = upstream_failures(after, FLAKY)
        if failures is not None:  # the two cut by the crash; the later ones found it out
            changed = delta(failures, upstream_failures(before, FLAKY) or {})
            assert changed.pop("broken_stream") == 2 and set(changed) <= {"unreachable"}
        assert after.value("llmserve_engine_healthy", model=FLAKY) == 0
        await assert_nothing_held(bench.url, bench.steady)

        # Back on the same address.
        await bench.flaky.start()
        await check_recovery(bench)
        await assert_nothing_held(bench.url, bench.flaky, bench.steady)


async def test_gateway_started_before_its_upstream_becomes_ready_when_it_comes() -> None:
    """Deployment order is not guaranteed: an upstream that is not there yet is 'not ready'
    and 503 (never a hang or a 500), and the gateway serves it as soon as it listens."""
    async with fault_bench(start_flaky=False) as bench:
        await ready_becomes(bench.url, 503, {FLAKY: False, STEADY: True})
        for stream in (True, False):
            assert_error_status(await call(bench.url, FLAKY, stream=stream), 503, UNREACHABLE)
        assert_completed(await call(bench.url, STEADY, stream=True), STEADY_TOKENS)
        await bench.flaky.start()
        await check_recovery(bench)
        await assert_nothing_held(bench.url, bench.flaky, bench.steady)


async def test_wedged_upstream_is_not_ready_and_probes_stay_bounded() -> None:
    """An upstream so stuck that its health endpoint hangs too (and its generations: one
    request times out with 504). /ready comes to say 503 naming it, every /ready answer comes
    within 6 s (the upstream health check's own 5 s timeout; note that the gateway's
    readinessProbe in deploy/k8s gives up after 3 s, which Kubernetes also counts as a
    failure), the other model serves meanwhile, and all is well once it answers again."""
    async with fault_bench() as bench:
        bench.flaky.set(HANG_BEFORE_HEADERS, health=None)
        steady, hung = await asyncio.gather(
            steady_streams(bench.url), call(bench.url, FLAKY, stream=False)
        )
        assert_error_status(hung, 504, FIRST_TOKEN)
        check_steady(steady)
        await ready_becomes(bench.url, 503, {FLAKY: False, STEADY: True}, within=12)
        await check_recovery(bench)
        await assert_nothing_held(bench.url, bench.flaky, bench.steady)


# ---------------------------------------------------------------------------------------------
# The in-process engine stopped, and crashing mid-stream
# ---------------------------------------------------------------------------------------------

SIM = "fault-sim"
SIM_OTHER = "fault-sim-other"
DEAD = frozenset({"engine_unavailable"})  # what the vLLM engine raises for EngineDeadError


def sim_settings() -> Settings:
    return Settings(
        models=[
            SimulatedModel(
                engine="simulated", name=name, tokens_per_second=100, first_token_latency_s=0.01
            )
            for name in (SIM, SIM_OTHER)
        ]
    )


async def test_in_process_engine_stopped_is_not_ready_until_started_again() -> None:
    """The simulated engine stopped (``close``) fails its health check: /ready is 503 naming it
    and llmserve_engine_healthy is 0; started again, both recover.

    Readiness only: the simulated engine, a test double, keeps generating after ``close()``,
    so what requests get from a stopped in-process engine is not checked here; the crash test
    below covers requests on an engine that dies mid-stream."""
    async with serve(sim_settings()) as server:
        engine = server.engine(SIM)
        await engine.close()
        status, body, _ = await ready(server.url)
        assert (status, body["models"]) == (503, {SIM: False, SIM_OTHER: True}), body
        assert (await scrape(server.url)).value("llmserve_engine_healthy", model=SIM) == 0
        await engine.start()
        status, body, _ = await ready(server.url)
        assert (status, body["models"]) == (200, {SIM: True, SIM_OTHER: True}), body
        assert (await scrape(server.url)).value("llmserve_engine_healthy", model=SIM) == 1
        await assert_nothing_held(server.url)


async def test_in_process_engine_dying_mid_stream_fails_only_its_requests() -> None:
    """The in-process engine dies after two tokens of every request, as vLLM's engine core
    does when its process is killed (the vLLM engine raises EngineUnavailable for
    EngineDeadError; the simulated engine cannot crash by itself, so its ``generate`` and
    ``check_health`` are replaced on the instance for the duration of the fault).

    Streams get the error in-band after their tokens; a whole request gets 503; the other
    in-process model is unaffected; /ready reports it; nothing is held; it recovers."""
    async with serve(sim_settings()) as server:
        engine = server.engine(SIM)
        generate, check_health = engine.generate, engine.check_health

        async def dying(request: ValidatedRequest) -> AsyncGenerator[EngineEvent, None]:
            sent = 0
            async for event in generate(request):
                yield event
                sent += 1
                if sent == 2:
                    raise EngineUnavailable("the engine is not running")

        async def dead() -> bool:
            return False

        engine.generate, engine.check_health = dying, dead
        before = await scrape(server.url)
        stream, completion_stream, whole, *others = await asyncio.gather(
            call(server.url, SIM, stream=True, max_tokens=20),
            call(server.url, SIM, stream=True, route="completions", max_tokens=20),
            call(server.url, SIM, stream=False, max_tokens=20),
            *(call(server.url, SIM_OTHER, stream=True, max_tokens=20) for _ in range(4)),
        )
        for seen in (stream, completion_stream):
            assert_in_band_error(seen, DEAD, words=" the quick brown")
        assert_error_status(whole, 503, DEAD)
        for seen in others:
            assert seen.status == 200 and seen.error is None and seen.done, seen
            assert seen.finish_reasons == ["length"], seen
        await settled_statuses(server.url, before, {SIM: {"engine_error": 3}, SIM_OTHER: {"ok": 4}})
        status, body, _ = await ready(server.url)
        assert (status, body["models"]) == (503, {SIM: False, SIM_OTHER: True}), body
        await assert_nothing_held(server.url)

        engine.generate, engine.check_health = generate, check_health
        status, _, _ = await ready(server.url)
        assert status == 200
        for stream_it in (True, False):
            seen = await call(server.url, SIM, stream=stream_it, max_tokens=5)
            assert seen.status == 200 and seen.error is None and seen.finish_reasons == ["length"]
        await assert_nothing_held(server.url)


# ---------------------------------------------------------------------------------------------
# Wrong-shaped upstream JSON, clients gone mid-body, a wedged upstream at start-up
# ---------------------------------------------------------------------------------------------

# Well-formed JSON of the wrong shape, as a buggy or hostile upstream may send after two good
# tokens. Each ends the request as an engine error (502 ``upstream_malformed`` before the first
# byte, in band after it), like non-JSON garbage does: never a 500 "internal server error",
# never counted as "internal".
WRONG_SHAPES = {
    "choices-not-a-list": b'{"choices": "oops"}',  # AttributeError
    "choice-null": b'{"choices": [null]}',  # AttributeError
    "index-not-a-number": b'{"choices": [{"index": "x", "delta": {"content": "a"}}]}',
    # n=1 was asked for: a choice index outside 0..n-1 is malformed, streamed or not.
    "index-out-of-range": b'{"choices": [{"index": 5, "delta": {"content": "a"}}]}',
    "logprob-without-token": (
        b'{"choices": [{"delta": {"content": "a"}, "logprobs": {"content": [{"x": 1}]}}]}'
    ),
    "usage-without-prompt-tokens": b'{"choices": [], "usage": {"completion_tokens": 1}}',
    "usage-not-numbers": (
        b'{"choices": [], "usage": {"prompt_tokens": "a", "completion_tokens": 1}}'
    ),
    # Negative counts are malformed too (they would otherwise reach the Prometheus counters).
    "usage-negative": b'{"choices": [], "usage": {"prompt_tokens": -5, "completion_tokens": 1}}',
}


@pytest.mark.parametrize("shape", list(WRONG_SHAPES))
async def test_wrong_shaped_upstream_json_is_an_engine_error_not_a_500(shape: str) -> None:
    """An upstream chunk of the wrong shape (see WRONG_SHAPES) after two good tokens: the
    stream ends with an in-band ``upstream_malformed`` error after exactly those two tokens
    (nothing of the bad chunk relayed), a whole request gets 502, both are counted as
    ``engine_error``, and nothing is held."""
    async with fault_bench() as bench:
        bench.flaky.set(after_words(WRONG_SHAPES[shape]))
        before = await scrape(bench.url)
        stream, whole = await asyncio.gather(
            call(bench.url, FLAKY, stream=True), call(bench.url, FLAKY, stream=False)
        )
        assert_in_band_error(stream, MALFORMED)
        assert stream.text == "".join(WORDS[:2]), stream  # nothing of the bad chunk relayed
        assert_error_status(whole, 502, MALFORMED)
        await settled_statuses(bench.url, before, {FLAKY: {"engine_error": 2}})
        await assert_nothing_held(bench.url, bench.flaky)


async def test_client_gone_mid_body_is_a_disconnect_not_an_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that goes away while sending its body (Content-Length promises 100 bytes, 16
    arrive, then the connection closes) is the client's doing, not a gateway bug: no ERROR log
    line (no traceback) and no ``llmserve_rejections_total{reason="internal"}``, the signal
    operators alert on for gateway bugs; and nothing is held."""
    caplog.set_level(logging.ERROR)
    async with serve(sim_settings()) as server:
        before = await scrape(server.url)
        host, port = server.url.removeprefix("http://").split(":")
        for _ in range(3):
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n" + b'{"model": "fault'
            )
            await writer.drain()
            await asyncio.sleep(0.1)  # the route is reading the body
            writer.close()
            await writer.wait_closed()
        await asyncio.sleep(0.3)
        after = await scrape(server.url)
        await assert_nothing_held(server.url)
    internal = after.value("llmserve_rejections_total", reason="internal") - before.value(
        "llmserve_rejections_total", reason="internal"
    )
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert (internal, errors) == (0, [])


async def test_wedged_upstream_does_not_hold_back_the_other_models_at_start() -> None:
    """An upstream whose /health hangs (a wedged server, or an address that drops packets),
    configured first, holds back no other model at start-up: half a second after the gateway
    starts, the model configured after it serves a full stream and /ready counts it ready,
    rather than waiting out the wedged upstream's health timeout (5 s by default). Only the
    wedged model's requests suffer."""
    flaky, steady = upstreams()
    flaky.set(HANG_BEFORE_HEADERS, health=None)
    await flaky.start()
    await steady.start()
    try:
        async with serve(fault_settings(flaky, steady)) as gateway:
            await asyncio.sleep(0.5)  # far more than a healthy upstream's health check takes
            first = await call(gateway.url, STEADY, stream=True)
            _, body, _ = await ready(gateway.url)
    finally:
        await flaky.stop()
        await steady.stop()
    assert body["models"][STEADY] is True, body
    assert_completed(first, STEADY_TOKENS)
