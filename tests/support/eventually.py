"""Waiting on a condition instead of sleeping for a guessed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


async def eventually(
    condition: Callable[[], object] | Callable[[], Awaitable[object]],
    within: float = 2.0,
    what: str = "",
    interval: float = 0.01,
) -> float:
    """Poll ``condition`` (sync or async) until it returns something truthy; return the seconds
    it took. Fails with an AssertionError naming ``what`` and the last value seen."""
    started = time.monotonic()
    await until(condition, within, what, interval)
    return time.monotonic() - started


@overload
async def until(
    condition: Callable[[], Awaitable[T | None]],
    within: float = ...,
    what: str = ...,
    interval: float = ...,
) -> T: ...
@overload
async def until(
    condition: Callable[[], T | None],
    within: float = ...,
    what: str = ...,
    interval: float = ...,
) -> T: ...
async def until(
    condition: Callable[[], Any],
    within: float = 2.0,
    what: str = "",
    interval: float = 0.01,
) -> Any:
    """As :func:`eventually`, but return the truthy value itself (a log record, a request id)."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what or condition}; last: {value!r}")
        await asyncio.sleep(interval)
