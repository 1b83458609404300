"""Logs: JSON lines, one access line per request (refusals included) with its request id, key
name, model, tokens and outcome; ``X-Request-ID`` taken when sane and always echoed; the key and
the prompt never logged, even at DEBUG."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmserve.config import ObservabilityConfig
from llmserve.observability import logs
from tests.conftest import serve
from tests.observability.helpers import (
    add_key,
    bearer,
    chat,
    completion,
    read_stream,
    settings,
    sim_model,
)
from tests.support.eventually import eventually

GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


class Captured:
    def __init__(self, buffer: io.StringIO) -> None:
        self.buffer = buffer

    def records(self) -> list[dict[str, Any]]:
        lines = [line for line in self.buffer.getvalue().splitlines() if line.strip()]
        return [json.loads(line) for line in lines]  # every line is one JSON object

    def access(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["logger"] == "llmserve.access"]

    def access_for(self, request_id: str) -> list[dict[str, Any]]:
        return [r for r in self.access() if r["request_id"] == request_id]

    async def wait_for(self, request_id: str, within: float = 5.0) -> dict[str, Any]:
        """The access line of ``request_id`` (a stream's is written after its last byte)."""
        await eventually(lambda: self.access_for(request_id), within, request_id)
        (line,) = self.access_for(request_id)
        return line


@contextmanager
def json_logs(level: str = "info") -> Iterator[Captured]:
    """``logs.configure(level, "json")``, its handler writing to a buffer; the root logger's
    handlers and level restored after."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    buffer = io.StringIO()
    try:
        logs.configure(level, "json")
        (handler,) = root.handlers
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(buffer)
        yield Captured(buffer)
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "keys.yaml"


async def test_access_line_per_request(keys_file: Path) -> None:
    model = "obs-l-sim"
    key = add_key(keys_file, "obs-l-tenant")
    with json_logs() as captured:
        async with (
            serve(settings(sim_model(model), keys_file=keys_file)) as server,
            httpx.AsyncClient(base_url=server.url, timeout=10, headers=bearer(key)) as client,
        ):
            r = await client.post(
                "/v1/chat/completions", json=chat(model, 3), headers={"X-Request-ID": "abc-123"}
            )
            assert r.status_code == 200, r.text
            assert r.headers["x-request-id"] == "abc-123"
            whole = r.json()
            streamed = await read_stream(
                client,
                "/v1/completions",
                completion(model, 4, stream=True),
                headers={"X-Request-ID": "stream-1"},
            )
            assert streamed.status == 200 and streamed.usage is not None
            assert streamed.headers["x-request-id"] == "stream-1"
            r = await client.get("/health", headers={"X-Request-ID": "probe-1"})
            assert r.headers["x-request-id"] == "probe-1"
            line = await captured.wait_for("abc-123")
            stream_line = await captured.wait_for("stream-1")
            probe_line = await captured.wait_for("probe-1")

    assert line["logger"] == "llmserve.access" and line["level"] == "INFO"
    assert line["message"] == "access" and "time" in line
    assert line["method"] == "POST"
    assert line["path"] == "/v1/chat/completions"
    assert line["status"] == 200
    assert isinstance(line["duration_ms"], int | float) and line["duration_ms"] >= 0
    assert line["key"] == "obs-l-tenant"
    assert line["model"] == model
    assert line["generation_id"] == whole["id"]
    assert line["prompt_tokens"] == whole["usage"]["prompt_tokens"] > 0
    assert line["completion_tokens"] == whole["usage"]["completion_tokens"] == 3
    assert line["outcome"] == "ok"
    assert line["queue_wait_ms"] >= 0

    assert stream_line["path"] == "/v1/completions" and stream_line["status"] == 200
    assert stream_line["key"] == "obs-l-tenant" and stream_line["model"] == model
    assert stream_line["prompt_tokens"] == streamed.usage["prompt_tokens"]
    assert stream_line["completion_tokens"] == streamed.usage["completion_tokens"] == 4
    assert stream_line["outcome"] == "ok"

    # A public route: an access line too, without a key or generation fields.
    assert probe_line["method"] == "GET" and probe_line["path"] == "/health"
    assert probe_line["status"] == 200 and probe_line["key"] is None
    assert "model" not in probe_line and "outcome" not in probe_line
    # One line per request.
    assert len(captured.access()) == 3


@pytest.mark.parametrize(
    "sent",
    [
        "a" * 129,  # too long
        "has space",
        "semi;colon",
        "slash/x",
        'quote"x',
        "",
    ],
)
async def test_bogus_request_id_is_replaced_and_echoed(sent: str) -> None:
    with json_logs() as captured:
        async with (
            serve(settings(sim_model("obs-l-ids"))) as server,
            httpx.AsyncClient(base_url=server.url, timeout=10) as client,
        ):
            r = await client.get("/health", headers={"X-Request-ID": sent})
            echoed = r.headers["x-request-id"]
            assert echoed != sent and GENERATED_ID.match(echoed), echoed
            line = await captured.wait_for(echoed)
    assert line["path"] == "/health"
    assert sent not in {r.get("request_id") for r in captured.access()}


async def test_sane_request_ids_are_kept_and_missing_ones_generated() -> None:
    longest = "A" * 128
    with json_logs() as captured:
        async with (
            serve(settings(sim_model("obs-l-ids2"))) as server,
            httpx.AsyncClient(base_url=server.url, timeout=10) as client,
        ):
            for sent in (longest, "trace.id:1_2-3"):
                r = await client.get("/health", headers={"X-Request-ID": sent})
                assert r.headers["x-request-id"] == sent
                await captured.wait_for(sent)
            first = (await client.get("/health")).headers["x-request-id"]
            second = (await client.get("/health")).headers["x-request-id"]
            assert GENERATED_ID.match(first) and GENERATED_ID.match(second)
            assert first != second
            await captured.wait_for(first)
            await captured.wait_for(second)


async def test_refused_requests_get_access_lines(keys_file: Path) -> None:
    model = "obs-l-refused"
    key = add_key(keys_file, "obs-l-refused-key")
    sim = sim_model(model, tokens_per_second=20, max_in_flight=1, max_waiting_requests=0)
    with json_logs() as captured:
        async with (
            serve(settings(sim, keys_file=keys_file)) as server,
            httpx.AsyncClient(base_url=server.url, timeout=10) as client,
        ):
            r = await client.post(
                "/v1/completions", json=completion(model, 1), headers={"X-Request-ID": "r-401"}
            )
            assert r.status_code == 401 and r.headers["x-request-id"] == "r-401"
            r = await client.post(
                "/v1/completions",
                content=b"{not json",
                headers={
                    **bearer(key),
                    "X-Request-ID": "r-400",
                    "Content-Type": "application/json",
                },
            )
            assert r.status_code == 400 and r.headers["x-request-id"] == "r-400"
            holder = asyncio.create_task(
                client.post(
                    "/v1/completions",
                    json=completion(model, 10),
                    headers={**bearer(key), "X-Request-ID": "r-holder"},
                )
            )
            await eventually(lambda: server.models.admission(model).in_flight == 1, within=5.0)
            r = await client.post(
                "/v1/completions",
                json=completion(model, 1),
                headers={**bearer(key), "X-Request-ID": "r-503"},
            )
            assert r.status_code == 503 and r.headers["x-request-id"] == "r-503"
            assert (await holder).status_code == 200
            unauthorized = await captured.wait_for("r-401")
            invalid = await captured.wait_for("r-400")
            full = await captured.wait_for("r-503")
            served = await captured.wait_for("r-holder")

    assert unauthorized["status"] == 401 and unauthorized["key"] is None
    assert unauthorized["path"] == "/v1/completions" and "outcome" not in unauthorized
    assert invalid["status"] == 400 and invalid["key"] == "obs-l-refused-key"
    assert "outcome" not in invalid  # refused before it became a generation
    assert full["status"] == 503 and full["key"] == "obs-l-refused-key"
    assert full["model"] == model and full["outcome"] == "queue_full"
    assert full["completion_tokens"] == 0 and full["queue_wait_ms"] is None
    assert served["status"] == 200 and served["outcome"] == "ok"


async def test_no_key_or_prompt_in_any_log_at_debug(
    keys_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = "obs-l-secret"
    key = add_key(keys_file, "obs-l-secret-key")
    narrow = add_key(keys_file, "obs-l-narrow", models=["obs-l-elsewhere"])
    wrong = "sk-llmserve-" + "W" * 43
    prompt = "xylophone periwinkle gazebo"
    sims = (sim_model(model), sim_model("obs-l-secret-short", max_model_len=8))
    with json_logs("debug") as captured:
        async with (
            serve(settings(*sims, keys_file=keys_file)) as server,
            httpx.AsyncClient(base_url=server.url, timeout=10) as client,
        ):
            messages = [{"role": "user", "content": prompt}]
            requests = [
                (key, "/v1/chat/completions", chat(model, 3, messages=messages)),
                (key, "/v1/completions", completion(model, 3, prompt=prompt, stream=True)),
                (key, "/generate", {"model": model, "prompt": prompt, "max_tokens": 2}),
                # refused: a wrong key, a model the key may not use, a context too long
                (wrong, "/v1/completions", completion(model, 3, prompt=prompt)),
                (narrow, "/v1/completions", completion(model, 3, prompt=prompt)),
                (key, "/v1/completions", completion("obs-l-secret-short", 10, prompt=prompt)),
            ]
            statuses = []
            for number, (presented, path, body) in enumerate(requests):
                request_id = f"secret-{number}"
                headers = {**bearer(presented), "X-Request-ID": request_id}
                result = await read_stream(client, path, body, headers=headers)
                statuses.append(result.status)
                await captured.wait_for(request_id)
            assert statuses == [200, 200, 200, 401, 403, 400]

    output = captured.buffer.getvalue()
    seen = capsys.readouterr()
    assert any(r["level"] == "DEBUG" for r in captured.records())  # DEBUG is on
    for secret in (key, narrow, wrong, key[len("sk-llmserve-") :], prompt, *prompt.split()):
        assert secret not in output, secret
        assert secret not in seen.out and secret not in seen.err, secret


async def test_access_log_off_still_echoes_the_request_id() -> None:
    quiet = settings(sim_model("obs-l-quiet"), observability=ObservabilityConfig(access_log=False))
    with json_logs() as captured:
        async with (
            serve(quiet) as server,
            httpx.AsyncClient(base_url=server.url, timeout=10) as client,
        ):
            r = await client.post(
                "/v1/completions",
                json=completion("obs-l-quiet", 2),
                headers={"X-Request-ID": "q-1"},
            )
            assert r.status_code == 200 and r.headers["x-request-id"] == "q-1"
    assert captured.access() == []
