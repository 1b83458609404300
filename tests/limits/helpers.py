"""Shared pieces of the rate-limit tests over real servers."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.errors import assert_openai_error

RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)
DURATION = r"\d+ms|\d+s|\d+m\d+s"


def assert_rate_limited(
    response: httpx.Response, code: str = "rate_limit_exceeded", says: str | None = None
) -> None:
    assert_openai_error(response, 429, type="rate_limit_error", code=code, message_contains=says)


def retry_after(response: httpx.Response) -> int:
    raw = response.headers.get("retry-after")
    assert raw is not None and raw.isdigit(), f"Retry-After must be whole seconds: {raw!r}"
    return int(raw)


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    """The value of one sample on /metrics (0 when it has not been created yet)."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


@dataclass(frozen=True)
class Accounted:
    key: str
    request_id: str
    cost: int
    used: int | None = None  # None for a reservation


class LimiterSpy:
    """Every reservation the limiter granted and every release, in order."""

    def __init__(self) -> None:
        self.reserved: list[Accounted] = []
        self.released: list[Accounted] = []
        # ("reserve" | "release", request id), in the order they happened.
        self.log: list[tuple[str, str]] = []

    def released_for(self, key: str) -> list[Accounted]:
        return [r for r in self.released if r.key == key]

    def reserved_for(self, key: str) -> list[Accounted]:
        return [r for r in self.reserved if r.key == key]

    def assert_balanced(self) -> None:
        """Every granted reservation was released exactly once, nothing else was."""
        reserved = [r.request_id for r in self.reserved]
        released = [r.request_id for r in self.released]
        assert len(set(reserved)) == len(reserved)
        assert sorted(released) == sorted(reserved), (reserved, released)


class RawRequest:
    """A POST over a bare socket, so a test can drop the connection at any moment."""

    def __init__(self, url: str, path: str, body: dict[str, Any], key: str) -> None:
        self._host, port = url.removeprefix("http://").split(":")
        self._port = int(port)
        self._path = path
        self._body = json.dumps(body).encode()
        self._key = key
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.received = b""

    async def send(self) -> RawRequest:
        self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        head = (
            f"POST {self._path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {self._key}\r\nContent-Length: {len(self._body)}\r\n\r\n"
        )
        self._writer.write(head.encode() + self._body)
        await self._writer.drain()
        return self

    async def read_until(self, marker: bytes, within: float = 5.0) -> bytes:
        assert self._reader is not None
        async with asyncio.timeout(within):
            while marker not in self.received:
                chunk = await self._reader.read(65536)
                assert chunk, f"connection closed before {marker!r}: {self.received!r}"
                self.received += chunk
        return self.received

    async def close(self) -> None:
        assert self._writer is not None
        self._writer.close()
        await self._writer.wait_closed()
