"""Shared pieces of the observability tests: settings, /metrics scrapes as deltas, streams.

The Prometheus counters and histograms live in the process-global default registry, so tests
compare a scrape before with one after, on model and key names that no other test uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from llmserve.auth.keys import KeyRecord, KeysFile, hash_key, new_key, read_keys, write_keys
from llmserve.config import (
    AdmissionConfig,
    AuthConfig,
    Limits,
    ModelConfig,
    Settings,
    SimulatedModel,
)
from tests.support.eventually import eventually
from tests.support.sse import aiter_events

# The simulated engine's word tokeniser counts this prompt as 3 tokens.
PROMPT = "observe these tokens"


def sim_model(
    name: str,
    *,
    tokens_per_second: float = 200.0,
    first_token_latency_s: float = 0.01,
    max_model_len: int = 4096,
    **admission: Any,
) -> SimulatedModel:
    return SimulatedModel(
        engine="simulated",
        name=name,
        tokens_per_second=tokens_per_second,
        first_token_latency_s=first_token_latency_s,
        max_model_len=max_model_len,
        admission=AdmissionConfig(**admission),
    )


def settings(
    *models: ModelConfig,
    limits: Limits | None = None,
    keys_file: Path | None = None,
    **overrides: Any,
) -> Settings:
    """Settings for these models; with ``keys_file``, API keys ON (the suite runs with them off)."""
    if keys_file is not None:
        overrides["auth"] = AuthConfig(enabled=True, keys_file=keys_file, reload_interval_s=0.1)
    return Settings(models=list(models), limits=limits or Limits(), **overrides)


def add_key(path: Path, name: str, **fields: Any) -> str:
    """Append a key to the keys file; returns the plaintext key."""
    keys = read_keys(path) if path.exists() else KeysFile()
    key = new_key()
    keys.keys.append(KeyRecord(name=name, hash=hash_key(key), hint=key[:16], **fields))
    write_keys(path, keys)
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(model: str, max_tokens: int, *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(extra)
    return body


def completion(
    model: str, max_tokens: int, *, stream: bool = False, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(extra)
    return body


@dataclass
class StreamResult:
    status: int
    headers: httpx.Headers
    deltas: int = 0  # text frames ("content"/"text"/"token")
    usage: dict[str, int] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)


async def read_stream(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], **kwargs: Any
) -> StreamResult:
    """POST and read an SSE stream to its end: OpenAI chunks or the ``/generate`` events."""
    async with client.stream("POST", path, json=body, **kwargs) as response:
        result = StreamResult(response.status_code, response.headers)
        async for event in aiter_events(response):
            if event.done:
                continue
            data = event.json()
            if event.event == "end":
                result.usage = data["usage"]
            elif event.event == "error" or "error" in data:
                result.errors.append(data)
            elif "token" in data:
                result.deltas += 1
            else:
                if data.get("id"):
                    result.ids.add(data["id"])
                if data.get("usage"):
                    result.usage = data["usage"]
                for choice in data.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") or choice.get("text")
                    if text:
                        result.deltas += 1
    return result


Labels = frozenset[tuple[str, str]]


@dataclass
class Scrape:
    """One /metrics body, parsed: sample name and labels → value."""

    text: str
    samples: dict[tuple[str, Labels], float]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return cls(text, samples)

    def value(self, metric: str, /, **labels: str) -> float:
        """The sum of the samples named ``name`` whose labels include ``labels`` (0 if none)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == metric and wanted <= ls)

    def has(self, metric: str, /, **labels: str) -> bool:
        wanted = set(labels.items())
        return any(n == metric and wanted <= ls for (n, ls) in self.samples)

    def label_values(self) -> set[str]:
        return {value for (_, labels) in self.samples for _, value in labels}

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


async def scrape(url: str) -> Scrape:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url + "/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape.parse(response.text)


class Deltas:
    """Scrape once now; ``after()`` scrapes again and answers differences."""

    def __init__(self, url: str, before: Scrape) -> None:
        self.url = url
        self.before = before
        self.now = before

    @classmethod
    async def start(cls, url: str) -> Deltas:
        return cls(url, await scrape(url))

    async def after(self) -> Deltas:
        self.now = await scrape(self.url)
        return self

    def __call__(self, metric: str, /, **labels: str) -> float:
        return self.now.value(metric, **labels) - self.before.value(metric, **labels)

    async def until(
        self, metric: str, expected: float, /, within: float = 5.0, **labels: str
    ) -> None:
        """Scrape until the delta of ``name`` reaches ``expected`` (finishing streams record
        after their last byte), then check it is exactly that."""

        async def reached() -> bool:
            await self.after()
            return self(metric, **labels) >= expected

        await eventually(reached, within, f"{metric}{labels} reaching {expected}", 0.02)
        assert self(metric, **labels) == expected, (metric, labels, self(metric, **labels))
