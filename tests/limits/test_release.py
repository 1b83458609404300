"""A request's concurrency slot and token reservation are given back on every exit path:
success, engine failure (before the first token and mid-stream), the request timeout, and the
client going away mid-stream or while still queued, and the queue refusing it (full, timeout).

Each case runs one request of key "lim" (max_concurrent=2, tpm=1000) that reserves 402 tokens,
then checks that the key can again run max_concurrent requests of 402 tokens at once. A leaked
slot refuses one of them (concurrency); a reservation not refunded refuses one (tokens: 598 left
of the 804 needed, and the bucket refills only ~17 tokens a second).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.config import AdmissionConfig, Limits, ModelConfig, SimulatedModel, UpstreamModel
from llmserve.engines.events import EngineEvent
from llmserve.engines.simulated import SimulatedEngine
from llmserve.errors import EngineFailure
from llmserve.validation.request import ValidatedRequest
from tests.auth.helpers import PROMPT_TOKENS, add_key, auth_settings, bearer, completion
from tests.conftest import RunningServer, free_port, serve, sim_engine
from tests.limits.helpers import LimiterSpy, RawRequest
from tests.support.errors import assert_openai_error
from tests.support.eventually import eventually
from tests.support.sse import parse_events

LONG = 400  # max_tokens of the request under test: 8 s at 50 tokens/s, so it never finishes
COST = PROMPT_TOKENS + LONG
PATH = "/v1/completions"


@dataclass
class Case:
    server: RunningServer
    client: httpx.AsyncClient  # key "lim"
    lim: str
    bg: str  # a key without limits, to occupy the engine

    @property
    def engine(self) -> SimulatedEngine:
        return sim_engine(self.server, "gen")


def models(closed_port: int) -> list[ModelConfig]:
    return [
        # One request on the engine at a time, so a second one queues.
        SimulatedModel(
            engine="simulated",
            name="gen",
            tokens_per_second=50,
            first_token_latency_s=0.02,
            max_model_len=4096,
            admission=AdmissionConfig(max_in_flight=1),
        ),
        # One running, none waiting: a second request is refused at once.
        SimulatedModel(
            engine="simulated",
            name="tight",
            tokens_per_second=50,
            first_token_latency_s=0.02,
            max_model_len=4096,
            admission=AdmissionConfig(max_in_flight=1, max_waiting_requests=0),
        ),
        # Nothing listens there: the engine fails before the first token.
        UpstreamModel(
            engine="openai",
            name="down",
            url=f"http://127.0.0.1:{closed_port}",
            max_model_len=4096,
            connect_timeout_s=2,
        ),
    ]


def long_request(model: str = "gen", stream: bool = False) -> dict[str, object]:
    return completion(model, LONG, stream=stream)


async def quota_is_free(case: Case) -> None:
    """max_concurrent requests of the same cost, at once, are all admitted."""
    # Stopped by " brown" after 3 tokens (~0.06 s each; the second queues behind the first).
    body = completion("gen", LONG, stop=[" brown"])
    responses = await asyncio.gather(*(case.client.post(PATH, json=body) for _ in range(2)))
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    for response in responses:
        assert response.json()["usage"]["completion_tokens"] == 3


# --- the exit paths ----------------------------------------------------------------------------


async def success(case: Case) -> None:
    response = await case.client.post(PATH, json=completion("gen", LONG, stop=[" quick"]))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "stop"


async def success_stream(case: Case) -> None:
    body = completion("gen", LONG, stop=[" quick"], stream=True)
    response = await case.client.post(PATH, json=body)
    assert response.status_code == 200
    assert parse_events(response.content)[-1].done


async def engine_unreachable(case: Case) -> None:
    response = await case.client.post(PATH, json=long_request("down"))
    assert_openai_error(response, 503, code="no_healthy_replica")


async def engine_unreachable_stream(case: Case) -> None:
    response = await case.client.post(PATH, json=long_request("down", stream=True))
    # failed before the first byte
    assert_openai_error(response, 503, code="no_healthy_replica")


def failing_after_first_token(engine: SimulatedEngine) -> None:
    """The engine's next request fails after its first token; later ones run normally."""
    real = engine.generate

    async def generate(request: ValidatedRequest) -> AsyncGenerator[EngineEvent, None]:
        engine.generate = real  # type: ignore[method-assign]
        events = real(request)
        try:
            yield await anext(events)
            raise EngineFailure("the engine died")
        finally:
            await events.aclose()

    engine.generate = generate  # type: ignore[method-assign]


def stream_error(response: httpx.Response) -> dict[str, Any]:
    """The in-band error event of a stream that failed after it started."""
    assert response.status_code == 200
    bodies = [event.json() for event in parse_events(response.content) if not event.done]
    errors = [body for body in bodies if "error" in body]
    assert len(errors) == 1, response.text
    return assert_openai_error(errors[0])


async def engine_fails_mid_stream(case: Case) -> None:
    failing_after_first_token(case.engine)
    response = await case.client.post(PATH, json=long_request(stream=True))
    error = stream_error(response)
    assert error["code"] == "engine_error"
    assert "the engine died" in error["message"]


async def engine_fails_whole(case: Case) -> None:
    failing_after_first_token(case.engine)
    response = await case.client.post(PATH, json=long_request())
    assert_openai_error(response, 502, code="engine_error")


async def timeout(case: Case) -> None:
    response = await case.client.post(PATH, json=long_request())
    assert_openai_error(response, 504, code="request_timeout")


async def timeout_stream(case: Case) -> None:
    response = await case.client.post(PATH, json=long_request(stream=True))
    assert stream_error(response)["code"] == "request_timeout"


async def disconnect_mid_stream(case: Case) -> None:
    raw = await RawRequest(case.server.url, PATH, long_request(stream=True), case.lim).send()
    await raw.read_until(b"data: {")
    await raw.close()
    await eventually(lambda: not case.engine.active, what="the engine request aborted", within=3.0)
    assert len(case.engine.aborted) == 1


async def disconnect_while_running(case: Case) -> None:
    raw = await RawRequest(case.server.url, PATH, long_request(), case.lim).send()
    await eventually(lambda: len(case.engine.active) == 1, what="the request running", within=3.0)
    await raw.close()
    await eventually(lambda: not case.engine.active, what="the engine request aborted", within=3.0)
    assert len(case.engine.aborted) == 1


async def occupy(case: Case, model: str = "gen") -> RawRequest:
    """A request of the unlimited key that holds the model's only engine slot."""
    blocker = await RawRequest(case.server.url, PATH, long_request(model, True), case.bg).send()
    await blocker.read_until(b"data: {")
    return blocker


async def release_engine(case: Case, blocker: RawRequest, model: str = "gen") -> None:
    await blocker.close()
    engine = sim_engine(case.server, model)
    await eventually(lambda: not engine.active, what="the blocker aborted", within=3.0)
    assert len(engine.started) == 1  # the request under test never reached the engine


async def disconnect_while_queued(case: Case, stream: bool) -> None:
    blocker = await occupy(case)
    admission = case.server.models.admission("gen")
    raw = await RawRequest(case.server.url, PATH, long_request(stream=stream), case.lim).send()
    await eventually(lambda: admission.queued == 1, what="the request queued", within=3.0)
    await raw.close()
    await eventually(lambda: admission.queued == 0, what="the waiter left the queue", within=3.0)
    await release_engine(case, blocker)


async def queue_full(case: Case) -> None:
    blocker = await occupy(case, "tight")
    response = await case.client.post(PATH, json=long_request("tight", stream=True))
    assert_openai_error(response, 503, code="queue_full")
    await release_engine(case, blocker, "tight")


async def queue_timeout(case: Case) -> None:
    blocker = await occupy(case)
    response = await case.client.post(PATH, json=long_request(), headers={"X-Queue-Timeout": "0.2"})
    assert_openai_error(response, 503, code="queue_timeout")
    await release_engine(case, blocker)


async def disconnect_while_queued_stream(case: Case) -> None:
    await disconnect_while_queued(case, stream=True)


async def disconnect_while_queued_whole(case: Case) -> None:
    await disconnect_while_queued(case, stream=False)


Action = Callable[[Case], Awaitable[None]]
CASES: list[tuple[Action, float]] = [
    (success, 600.0),
    (success_stream, 600.0),
    (engine_unreachable, 600.0),
    (engine_unreachable_stream, 600.0),
    (engine_fails_mid_stream, 600.0),
    (engine_fails_whole, 600.0),
    (timeout, 0.5),
    (timeout_stream, 0.5),
    (disconnect_mid_stream, 600.0),
    (disconnect_while_running, 600.0),
    (disconnect_while_queued_stream, 600.0),
    (disconnect_while_queued_whole, 600.0),
    (queue_full, 600.0),
    (queue_timeout, 600.0),
]


@pytest.mark.parametrize(("action", "request_timeout_s"), CASES, ids=[a.__name__ for a, _ in CASES])
async def test_slot_and_reservation_are_released(
    tmp_path: Path, limiter_spy: LimiterSpy, action: Action, request_timeout_s: float
) -> None:
    path = tmp_path / "keys.yaml"
    lim = add_key(path, "lim", max_concurrent=2, tpm=1000)
    bg = add_key(path, "bg")
    settings = auth_settings(
        path,
        models=models(free_port()),
        limits=Limits(request_timeout_s=request_timeout_s),
    )
    async with (
        serve(settings) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10, headers=bearer(lim)) as client,
    ):
        case = Case(server, client, lim, bg)
        await action(case)
        await eventually(
            lambda: len(limiter_spy.released_for("lim")) == 1, what="the release", within=3.0
        )
        (reserved,) = limiter_spy.reserved_for("lim")
        (released,) = limiter_spy.released_for("lim")
        assert reserved.request_id == released.request_id
        assert reserved.cost == COST or action in (engine_unreachable, engine_unreachable_stream)
        assert released.used is not None and released.used < released.cost / 2, released
        before = len(limiter_spy.log)
        await quota_is_free(case)
        # Both held their reservation at once (so a leaked slot would have refused one).
        assert [event for event, _ in limiter_spy.log[before:]] == [
            "reserve",
            "reserve",
            "release",
            "release",
        ]
    limiter_spy.assert_balanced()
