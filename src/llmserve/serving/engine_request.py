"""The one place an engine request is started, and the guarantee that it is always ended.

Whatever ends the consumer (success, engine error, timeout, client disconnect → cancellation),
an engine request that did not finish is aborted. The abort runs shielded: Starlette cancels
with anyio's level cancellation, under which any unshielded ``await`` in a ``finally`` is
cancelled again before it runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from llmserve.engines.base import Engine
from llmserve.engines.events import (
    ChoiceFinished,
    EngineEvent,
    Passthrough,
    TextDelta,
    TokenLogprob,
    UsageReport,
    merge_fields,
)
from llmserve.errors import EngineTimeout, LLMServeError
from llmserve.scheduling.admission import Admission, Ticket
from llmserve.validation.request import ValidatedRequest

log = logging.getLogger(__name__)


class RunObserver(Protocol):
    """Told what happens to a run: a plain call per event, not another generator layer."""

    def admitted(self, waited_s: float) -> None: ...

    def observe(self, event: EngineEvent) -> None: ...

    def ended(self, error: BaseException | None) -> None:
        """None: completed. Otherwise what ended it (GeneratorExit/CancelledError: the
        consumer went away, i.e. the client disconnected)."""


async def run_on_engine(
    engine: Engine,
    request: ValidatedRequest,
    timeout_s: float,
    admission: Admission | None = None,
    ticket: Ticket | None = None,
    observer: RunObserver | None = None,
) -> AsyncGenerator[EngineEvent, None]:
    """Events of one engine request: admitted first (when ``admission`` is given), aborted on
    any early exit, bounded by ``timeout_s`` (queue wait included), its slot always released.

    One flat generator and one timer per request, not a timeout scope per token: this is the
    per-token hot path of every stream.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    permit = None
    if admission is not None and ticket is not None:
        try:
            permit = await admission.acquire(ticket)
        except BaseException as exc:
            if observer is not None:
                observer.ended(exc)
            raise
        if observer is not None:
            observer.admitted(permit.waited_s)
    watchdog = _Deadline(loop, deadline, engine, request.request_id)
    finished = False
    error: BaseException | None = None
    events = engine.generate(request)
    try:
        async for event in events:
            if watchdog.expired:
                break
            if observer is not None:
                observer.observe(event)
            yield event
        else:
            finished = not watchdog.expired
    except LLMServeError as exc:
        if not watchdog.expired:
            error = exc
            raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        watchdog.cancel()
        with anyio.CancelScope(shield=True):
            if not finished and not watchdog.expired:  # an expired deadline aborted already
                await engine.abort(request.request_id)
            await events.aclose()
            if permit is not None:
                permit.release()
        if observer is not None and not watchdog.expired:
            observer.ended(error)
    if not watchdog.expired:
        return
    timeout = EngineTimeout(
        f"the request did not finish within {timeout_s:g} s", code="request_timeout"
    )
    if observer is not None:
        observer.ended(timeout)
    raise timeout


class _Deadline:
    """Aborts the engine request when the deadline passes; the generator then ends and the
    caller sees ``expired``. A stalled engine is stopped this way without a per-token timer."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, deadline: float, engine: Engine, request_id: str
    ) -> None:
        self.expired = False
        self._engine = engine
        self._request_id = request_id
        self._abort: asyncio.Task[None] | None = None
        self._handle = loop.call_at(deadline, self._fire)

    def _fire(self) -> None:
        self.expired = True
        self._abort = asyncio.ensure_future(self._engine.abort(self._request_id))

    def cancel(self) -> None:
        self._handle.cancel()


@dataclass(slots=True)
class ChoiceResult:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    # An upstream's fields beyond text (``Passthrough``), accumulated over the stream.
    message: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Collected:
    """A whole generation, gathered for a non-streaming response."""

    choices: list[ChoiceResult]
    prompt_tokens: int
    completion_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    usage_details: dict[str, Any] = field(default_factory=dict)


async def collect(events: AsyncIterator[EngineEvent], request: ValidatedRequest) -> Collected:
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
            if event.fields is not None:
                _gather(result, choice, event.fields)
        elif isinstance(event, ChoiceFinished):
            result.choices[event.index].finish_reason = event.reason
            if event.fields is not None:
                _gather(result, result.choices[event.index], event.fields)
        elif isinstance(event, UsageReport):
            usage = event
            if event.details:
                merge_fields(result.usage_details, event.details)
            if event.chunk:
                merge_fields(result.extra, event.chunk)
    result.completion_tokens = usage.completion_tokens if usage else counted
    if usage is not None:
        result.prompt_tokens = usage.prompt_tokens
    return result


def _gather(result: Collected, choice: ChoiceResult, fields: Passthrough) -> None:
    if fields.delta:
        merge_fields(choice.message, fields.delta)
    if fields.choice:
        merge_fields(choice.extra, fields.choice)
    if fields.chunk:
        merge_fields(result.extra, fields.chunk)
