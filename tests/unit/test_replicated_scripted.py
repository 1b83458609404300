"""Failover in ReplicatedEngine over scripted replicas, without sockets: a replica that fails
before the first event is replaced by another, once; one that fails after it is not (the
caller would get text twice); replicas that failed their health check get no requests; with
none left the caller gets 503 ``no_healthy_replica``; a caller that stops reading aborts the
replica that was serving it, and a deadline's abort is not failed over or held against it.

Which replica the balancer picks first is its own business (tests/unit/test_balancer.py), so
these tests script "the first attempt" and "the second attempt", wherever they land."""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Iterator

import pytest
from tests.support.eventually import eventually
from tests.support.scripted_engine import (
    Delay,
    Handler,
    Script,
    ScriptedEngine,
    Step,
    chat_request,
    read_until_error,
)

from llmserve.config import HealthConfig, RoutingConfig
from llmserve.engines.events import ChoiceFinished, EngineEvent, TextDelta
from llmserve.errors import (
    EngineFailure,
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    LLMServeError,
)
from llmserve.routing.replicated import ReplicatedEngine
from llmserve.serving.engine_request import run_on_engine
from llmserve.validation.request import ValidatedRequest

HEALTH = HealthConfig(interval_s=60, probe_interval_s=3, timeout_s=1)
REQUEST = chat_request()
RID = REQUEST.request_id
A, B = TextDelta(0, "a", 1), TextDelta(0, "b", 1)
# An engine that stalls: far longer than any deadline here, short enough that a test which
# waits it out fails at once.
STALL = Delay(5)
TOKENS: list[Step] = [A, B, ChoiceFinished(0, "length")]


def replicated(*replicas: ScriptedEngine) -> ReplicatedEngine:
    labels = [f"replica-{i}" for i in range(len(replicas))]
    return ReplicatedEngine("m", replicas, labels, RoutingConfig(), HEALTH)


def attempts(*scripts: Handler) -> Handler:
    """The n-th attempt of a request, on whichever replica, plays the n-th script."""
    made = 0

    def handler(request: ValidatedRequest) -> Script:
        nonlocal made
        made += 1
        return scripts[made - 1](request)

    return handler


def raising(error: LLMServeError) -> Handler:
    def handler(_: ValidatedRequest) -> list[Step]:
        raise error

    return handler


def playing(*steps: Step) -> Handler:
    return lambda _: list(steps)


async def checked(engine: ReplicatedEngine, replicas: list[ScriptedEngine]) -> None:
    """Start the health watchers and wait for every replica's first check."""
    await engine.start()
    await eventually(lambda: all(r.health_answers for r in replicas), what="the first checks")


def called(replicas: list[ScriptedEngine]) -> list[int]:
    return [len(r.calls) for r in replicas]


RETRYABLE = [
    EngineUnavailable("down", code="upstream_unreachable"),
    EngineFailure("broken", code="upstream_http_error"),
    EngineTimeout("silent", code="first_token_timeout"),
]


@pytest.mark.parametrize("error", RETRYABLE, ids=lambda e: e.code)
async def test_failure_before_the_first_event_is_retried_on_another_replica(
    error: LLMServeError,
) -> None:
    handler = attempts(raising(error), playing(*TOKENS))
    replicas = [ScriptedEngine(handler), ScriptedEngine(handler)]
    seen, failure = await read_until_error(replicated(*replicas).generate(REQUEST))
    assert (seen, failure) == (TOKENS, None)
    assert called(replicas) == [1, 1]  # tried once on each: the retry went elsewhere


async def test_request_the_engine_refused_is_not_retried() -> None:
    refusal = InvalidRequest("prompt too long", param="messages", code="context_length_exceeded")
    handler = attempts(raising(refusal), playing(*TOKENS))
    replicas = [ScriptedEngine(handler), ScriptedEngine(handler)]
    seen, failure = await read_until_error(replicated(*replicas).generate(REQUEST))
    assert (seen, failure) == ([], refusal)  # the request's own fault: any replica would refuse
    assert sum(called(replicas)) == 1


async def test_failure_after_the_first_event_reaches_the_caller_without_retry() -> None:
    broken = EngineFailure("stream broke", code="upstream_broken_stream")

    def breaks_after_a(_: ValidatedRequest) -> Iterator[Step]:
        yield A
        raise broken

    handler = attempts(breaks_after_a, playing(*TOKENS))
    replicas = [ScriptedEngine(handler), ScriptedEngine(handler)]
    seen, failure = await read_until_error(replicated(*replicas).generate(REQUEST))
    assert (seen, failure) == ([A], broken)  # no second "a" from a retry
    assert sum(called(replicas)) == 1


async def test_a_request_is_retried_once_and_the_last_error_is_the_callers() -> None:
    first = EngineUnavailable("down", code="upstream_unreachable")
    second = EngineTimeout("silent", code="first_token_timeout")
    handler = attempts(raising(first), raising(second), playing(*TOKENS))
    replicas = [ScriptedEngine(handler) for _ in range(3)]
    seen, failure = await read_until_error(replicated(*replicas).generate(REQUEST))
    assert (seen, failure) == ([], second)
    assert sorted(called(replicas)) == [0, 1, 1]


async def test_replica_that_failed_a_request_gets_no_more_until_checked() -> None:
    bad = ScriptedEngine(raising(EngineUnavailable("down", code="upstream_unreachable")))
    good = ScriptedEngine(playing(*TOKENS))
    engine = replicated(bad, good)
    for _ in range(4):
        assert await read_until_error(engine.generate(REQUEST)) == (TOKENS, None)
    assert called([bad, good]) == [1, 4]  # out after its first failure, whoever went first


async def test_replicas_whose_health_check_failed_are_skipped() -> None:
    replicas = [ScriptedEngine(playing(*TOKENS), healthy=h) for h in (False, True, False)]
    engine = replicated(*replicas)
    await checked(engine, replicas)
    try:
        for _ in range(4):
            assert await read_until_error(engine.generate(REQUEST)) == (TOKENS, None)
        assert called(replicas) == [0, 4, 0]
        assert [s.healthy for s in engine.status()] == [False, True, False]
    finally:
        await engine.close()


async def test_every_replica_down_is_503_no_healthy_replica_with_retry_after() -> None:
    replicas = [ScriptedEngine(playing(*TOKENS), healthy=False) for _ in range(2)]
    engine = replicated(*replicas)
    await checked(engine, replicas)
    try:
        seen, failure = await read_until_error(engine.generate(REQUEST))
        assert not await engine.check_health()
    finally:
        await engine.close()
    assert seen == []
    assert isinstance(failure, EngineUnavailable)
    assert (failure.status, failure.code) == (503, "no_healthy_replica")
    assert failure.retry_after_s == math.ceil(HEALTH.probe_interval_s)
    assert "2 of 2 out" in failure.message
    assert called(replicas) == [0, 0]


def serving_run(engine: ReplicatedEngine, timeout_s: float) -> AsyncGenerator[EngineEvent, None]:
    return run_on_engine(engine, REQUEST, timeout_s)


async def test_caller_that_stops_reading_aborts_the_replica_serving_it() -> None:
    handler = attempts(raising(EngineUnavailable("down")), playing(A, STALL, B))
    replicas = [ScriptedEngine(handler), ScriptedEngine(handler)]
    events = serving_run(replicated(*replicas), 10.0)
    assert await anext(events) == A
    await events.aclose()
    serving = next(r for r in replicas if r.closed_early)
    failed = next(r for r in replicas if r is not serving)
    assert serving.aborts == [RID]
    assert serving.closed_early == [RID]
    assert failed.aborts == []  # its attempt had ended: nothing of it runs any more


@pytest.mark.parametrize(
    "aborted_error",
    [None, EngineFailure("interrupted", code="upstream_broken_stream")],
    ids=["stream ends", "stream breaks"],
)
async def test_deadline_abort_is_not_failed_over_or_held_against_the_replica(
    aborted_error: LLMServeError | None,
) -> None:
    replicas = [ScriptedEngine(playing(STALL), aborted_error=aborted_error) for _ in range(2)]
    engine = replicated(*replicas)
    await checked(engine, replicas)
    try:
        seen, failure = await read_until_error(serving_run(engine, 0.05))
        statuses = engine.status()
    finally:
        await engine.close()
    assert seen == []
    assert isinstance(failure, EngineTimeout) and failure.code == "request_timeout"
    assert sorted(called(replicas)) == [0, 1]  # the other replica was not tried
    assert [r.aborts for r in replicas if r.calls] == [[RID]]
    assert all(s.healthy for s in statuses)  # the replica stays in
