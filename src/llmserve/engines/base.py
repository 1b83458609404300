"""The engine interface: generate → async iterator of events, abort, health, close."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol, runtime_checkable

from llmserve.engines.events import EngineEvent
from llmserve.validation.codec import PromptCodec
from llmserve.validation.request import ValidatedRequest


@runtime_checkable
class Engine(Protocol):
    """One model's inference engine."""

    @property
    def codec(self) -> PromptCodec: ...

    async def start(self) -> None:
        """Load or connect; returns once the engine can take requests."""

    def generate(self, request: ValidatedRequest) -> AsyncGenerator[EngineEvent, None]:
        """Stream events for one request. Closing the iterator early must abort the work."""

    async def abort(self, request_id: str) -> None:
        """Stop a request's work; a no-op for one that is unknown or already finished."""

    async def check_health(self) -> bool: ...

    async def close(self) -> None: ...
