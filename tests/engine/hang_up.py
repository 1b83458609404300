"""A client that starts a streamed completion and hangs up part-way: the engine tests' way of
abandoning a request while the engine still generates it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from tests.support.sse import aiter_events


@asynccontextmanager
async def stream_then_hang_up(
    url: str, body: dict[str, Any], events: int = 3
) -> AsyncIterator[None]:
    """POST ``body`` to /v1/completions and read ``events`` data events; the body of the ``with``
    runs while the stream is still open, and leaving it closes the connection mid-stream."""
    async with (
        httpx.AsyncClient(base_url=url, timeout=60) as http,
        http.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        seen = 0
        async for _ in aiter_events(response):
            seen += 1
            if seen >= events:
                break
        yield
