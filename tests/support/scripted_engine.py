"""ScriptedEngine: a test double at the engine seam, as httpx's MockTransport is at the
transport seam.

A handler decides what each request gets: it returns the steps to play (an iterable or async
iterable of engine events, ``Delay`` among them where time should pass), or raises one of the
llmserve errors; a generator handler raises after some events. The engine records what the
layers above did to it: every call, every abort, every stream closed before its end, every
health answer. An abort ends the request's stream at its next step, and cuts a ``Delay`` short
(so a script waits by yielding ``Delay``, not by sleeping): a stalled engine stops as a real one
does, and deadlines and disconnects are tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from llmserve.engines.events import EngineEvent
from llmserve.engines.simulated import WordCodec
from llmserve.errors import LLMServeError
from llmserve.validation.request import SamplingOptions, ValidatedRequest


@dataclass(frozen=True, slots=True)
class Delay:
    """A pause in a script (``Delay(60)`` stands for an engine that stalls)."""

    seconds: float


Step = EngineEvent | Delay
Script = Iterable[Step] | AsyncIterable[Step]
Handler = Callable[[ValidatedRequest], Script]


def chat_request(
    request_id: str = "chatcmpl-1", *, prompt_tokens: int = 5, max_tokens: int = 16
) -> ValidatedRequest:
    """A validated chat request, for layers below validation."""
    return ValidatedRequest(
        request_id, "m", "chat", "hi", None, prompt_tokens, SamplingOptions(max_tokens)
    )


class ScriptedEngine:
    """An Engine whose every request is played from ``handler(request)``."""

    def __init__(
        self,
        handler: Handler,
        *,
        healthy: bool = True,
        aborted_error: LLMServeError | None = None,
    ) -> None:
        self.handler = handler
        self.healthy = healthy  # what the next health check answers
        # How an aborted stream ends: quietly (vLLM, the simulated engine) or with this error
        # (an upstream, whose interrupted response reads as a broken stream).
        self.aborted_error = aborted_error
        self.calls: list[ValidatedRequest] = []
        self.aborts: list[str] = []  # request ids, in the order abort was called
        self.closed_early: list[str] = []  # streams closed or cancelled before their end
        self.completed: list[str] = []  # streams that played their whole script
        self.health_answers: list[bool] = []
        self.closed = False
        self._stops: dict[str, asyncio.Event] = {}
        self._codec = WordCodec(4096)

    @property
    def codec(self) -> WordCodec:
        return self._codec

    @property
    def call_ids(self) -> list[str]:
        return [request.request_id for request in self.calls]

    async def start(self) -> None:
        self.closed = False

    def generate(self, request: ValidatedRequest) -> AsyncGenerator[EngineEvent, None]:
        self.calls.append(request)  # at the call, not at the first read
        return self._play(request)

    async def abort(self, request_id: str) -> None:
        self.aborts.append(request_id)
        stop = self._stops.get(request_id)
        if stop is not None:
            stop.set()

    async def check_health(self) -> bool:
        self.health_answers.append(self.healthy)
        return self.healthy

    async def close(self) -> None:
        self.closed = True

    async def _play(self, request: ValidatedRequest) -> AsyncGenerator[EngineEvent, None]:
        rid = request.request_id
        stop = self._stops[rid] = asyncio.Event()
        steps: AsyncIterator[Step] | None = None
        try:
            steps = _steps(self.handler(request))
            async for step in steps:
                if isinstance(step, Delay):
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(step.seconds):
                            await stop.wait()
                if stop.is_set():
                    if self.aborted_error is not None:
                        raise self.aborted_error
                    return
                if not isinstance(step, Delay):
                    yield step
            self.completed.append(rid)
        except (GeneratorExit, asyncio.CancelledError):
            self.closed_early.append(rid)
            raise
        finally:
            self._stops.pop(rid, None)
            if isinstance(steps, AsyncGenerator):
                await steps.aclose()


def _steps(script: Script) -> AsyncIterator[Step]:
    if isinstance(script, AsyncIterable):
        return aiter(script)
    return _from_sync(script)


async def _from_sync(script: Iterable[Step]) -> AsyncGenerator[Step, None]:
    for step in script:
        yield step


async def read_until_error(
    events: AsyncIterator[EngineEvent], catching: type[BaseException] = LLMServeError
) -> tuple[list[EngineEvent], BaseException | None]:
    """Every event until the end, and the error (of ``catching``) that ended them, if one did."""
    seen: list[EngineEvent] = []
    try:
        async for event in events:
            seen.append(event)
    except catching as exc:
        return seen, exc
    return seen, None
