"""The one place an engine request is started, and the guarantee that it is always ended.

Whatever ends the consumer (success, engine error, timeout, client disconnect → cancellation),
an engine request that did not finish is aborted. The abort runs shielded: Starlette cancels
with anyio's level cancellation, under which any unshielded ``await`` in a ``finally`` is
cancelled again before it runs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

import anyio

from llmserve.engines.base import Engine
from llmserve.engines.events import (
    ChoiceFinished,
    EngineEvent,
    TextDelta,
    TokenLogprob,
    UsageReport,
)
from llmserve.errors import EngineTimeout
from llmserve.scheduling.admission import Admission, Ticket
from llmserve.validation.request import GenerationRequest

log = logging.getLogger(__name__)


async def run_on_engine(
    engine: Engine,
    request: GenerationRequest,
    timeout_s: float,
    admission: Admission | None = None,
    ticket: Ticket | None = None,
    on_admitted: Callable[[float], None] | None = None,
) -> AsyncGenerator[EngineEvent, None]:
    """Events of one engine request: admitted first (when ``admission`` is given), aborted on
    any early exit, bounded by ``timeout_s`` (queue wait included), its slot always released."""
    deadline = time.monotonic() + timeout_s
    with contextlib.ExitStack() as stack:
        if admission is not None and ticket is not None:
            permit = stack.enter_context(await admission.acquire(ticket))
            if on_admitted is not None:
                on_admitted(permit.waited_s)
        # aclosing: an early exit here must close (and so abort) the engine request at once,
        # not whenever the garbage collector finalises the inner generator.
        async with contextlib.aclosing(
            _engine_events(engine, request, deadline, timeout_s)
        ) as inner:
            async for event in inner:
                yield event


async def _engine_events(
    engine: Engine, request: GenerationRequest, deadline: float, timeout_s: float
) -> AsyncGenerator[EngineEvent, None]:
    finished = False
    events = engine.generate(request)
    try:
        while True:
            with anyio.fail_after(max(deadline - time.monotonic(), 0.0)):
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    finished = True
                    return
            yield event
    except TimeoutError as exc:
        raise EngineTimeout(
            f"the request did not finish within {timeout_s:g} s", code="request_timeout"
        ) from exc
    finally:
        with anyio.CancelScope(shield=True):
            if not finished:
                await engine.abort(request.request_id)
            await events.aclose()


@dataclass(slots=True)
class ChoiceResult:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(slots=True)
class Collected:
    """A whole generation, gathered for a non-streaming response."""

    choices: list[ChoiceResult]
    prompt_tokens: int
    completion_tokens: int = 0


async def collect(events: AsyncIterator[EngineEvent], request: GenerationRequest) -> Collected:
    result = Collected([ChoiceResult() for _ in range(request.sampling.n)], request.prompt_tokens)
    counted = 0
    usage: UsageReport | None = None
    async for event in events:
        if isinstance(event, TextDelta):
            choice = result.choices[event.index]
            choice.text.append(event.text)
            if event.logprobs:
                choice.logprobs.extend(event.logprobs)
            counted += event.num_tokens
        elif isinstance(event, ChoiceFinished):
            result.choices[event.index].finish_reason = event.reason
        else:
            usage = event
    result.completion_tokens = usage.completion_tokens if usage else counted
    if usage is not None:
        result.prompt_tokens = usage.prompt_tokens
    return result
