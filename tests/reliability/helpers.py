"""Shared pieces of the hostile-input, security and schemathesis tests: what every answer must
look like (an OpenAI error body, the security headers, no traceback), raw-socket exchanges that
send bytes exactly as given, /metrics reads for held slots, and the config of llmserve run as a
real process (tests/support/gateway.py) for what only a process shows: its RSS, its stderr, its
OTLP export, its uvicorn options."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.eventually import eventually

# What a security scan expects on every answer of an API (errors and streams included).
SECURITY_HEADERS: dict[str, str] = {
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}
# Headers that tell a scanner which software (and version) answers.
BANNER_HEADERS = ("server", "x-powered-by")

# Text that only a Python traceback or an internal path would put in a response or a log line.
TRACEBACK_MARKERS = (
    "Traceback (most recent call last)",
    'File "/',
    "site-packages",
    "/src/llmserve/",
)

ERROR_FIELDS = {"message", "type", "param", "code"}

# A request that must always succeed quickly on the servers these tests start ("sim" model).
PING_COMPLETION = {"model": "sim", "prompt": "still there", "max_tokens": 2}


def assert_no_traceback(blob: bytes | str, where: str = "") -> None:
    text = blob.decode("utf-8", "replace") if isinstance(blob, bytes) else blob
    for marker in TRACEBACK_MARKERS:
        assert marker not in text, f"{where}: traceback or internal path leaked: {text[:2000]}"


def assert_openai_error(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    expected_status: int | tuple[int, ...],
    *,
    code: str | None = None,
    param: str | tuple[str, ...] | None = None,
    error_type: str | None = None,
    where: str = "",
) -> dict[str, Any]:
    """The answer is ``expected_status`` with exactly the OpenAI error body
    ``{"error": {"message", "type", "param", "code"}}``, JSON, and no traceback."""
    expected = (expected_status,) if isinstance(expected_status, int) else expected_status
    assert status in expected, f"{where}: status {status}, expected {expected}: {body[:500]!r}"
    content_type = headers.get("content-type", "")
    assert content_type.startswith("application/json"), f"{where}: {content_type!r}: {body[:300]!r}"
    assert_no_traceback(body, where)
    document = json.loads(body)
    assert set(document) == {"error"}, f"{where}: {document}"
    error = document["error"]
    assert set(error) == ERROR_FIELDS, f"{where}: {error}"
    assert isinstance(error["message"], str) and error["message"], f"{where}: {error}"
    assert isinstance(error["type"], str) and error["type"], f"{where}: {error}"
    assert error["param"] is None or isinstance(error["param"], str), f"{where}: {error}"
    assert error["code"] is None or isinstance(error["code"], str), f"{where}: {error}"
    if code is not None:
        assert error["code"] == code, f"{where}: code {error['code']!r}, expected {code!r}"
    if param is not None:
        allowed = (param,) if isinstance(param, str) else param
        got = error["param"] or ""
        assert got.split(".")[0] in allowed, f"{where}: param {got!r}, expected one of {allowed}"
    if error_type is not None:
        assert error["type"] == error_type, f"{where}: type {error['type']!r}"
    return dict(error)


def assert_error_response(response: httpx.Response, expected_status: int, **kwargs: Any) -> Any:
    return assert_openai_error(
        response.status_code,
        response.headers,
        response.content,
        expected_status,
        where=kwargs.pop("where", f"{response.request.method} {response.request.url.path}"),
        **kwargs,
    )


def security_header_problems(headers: Mapping[str, str], where: str) -> list[str]:
    """What is wrong with one response's headers (empty when nothing is)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    problems = []
    for name, value in SECURITY_HEADERS.items():
        if lowered.get(name) != value:
            problems.append(f"{where}: {name} is {lowered.get(name)!r}, expected {value!r}")
    for name in BANNER_HEADERS:
        if name in lowered:
            problems.append(f"{where}: banner header {name}: {lowered[name]!r}")
    return problems


# --- raw sockets -------------------------------------------------------------------------------


@dataclass
class RawAnswer:
    """What came back on a raw connection: the bytes, and how the exchange ended."""

    data: bytes
    closed: bool  # the server closed (EOF or reset) within the time allowed
    elapsed_s: float

    @property
    def status(self) -> int | None:
        if not self.data.startswith(b"HTTP/"):
            return None
        return int(self.data.split(b" ", 2)[1])

    @property
    def headers(self) -> dict[str, str]:
        head = self.data.partition(b"\r\n\r\n")[0].decode("latin-1")
        result = {}
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            result[name.strip().lower()] = value.strip()
        return result

    @property
    def body(self) -> bytes:
        """The body, de-chunked when the answer was chunked."""
        payload = self.data.partition(b"\r\n\r\n")[2]
        if self.headers.get("transfer-encoding") != "chunked":
            return payload
        out = b""
        while payload:
            size_line, _, payload = payload.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out += payload[:size]
            payload = payload[size + 2 :]
        return out


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


async def raw_exchange(url: str, data: bytes, wait_s: float = 5.0) -> RawAnswer:
    """Send ``data`` as is (write errors ignored: a server may answer and close before reading
    everything), then read until the server closes or ``wait_s`` passes."""
    host, port = host_port(url)
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(host, port)
    received = b""
    closed = False
    try:
        try:
            writer.write(data)
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        try:
            async with asyncio.timeout(wait_s):
                while chunk := await reader.read(65536):
                    received += chunk
            closed = True
        except TimeoutError:
            pass
        except (ConnectionError, OSError):
            closed = True
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return RawAnswer(received, closed, time.monotonic() - started)


def request_head(method: str, target: str, headers: Mapping[str, str] | None = None) -> bytes:
    """A request head (with Connection: close), ending with the blank line."""
    lines = [f"{method} {target} HTTP/1.1"]
    all_headers = {"Host": "localhost", "Connection": "close", **(headers or {})}
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def post_bytes(target: str, body: bytes, headers: Mapping[str, str] | None = None) -> bytes:
    all_headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        **(headers or {}),
    }
    return request_head("POST", target, all_headers) + body


# --- what the server holds ---------------------------------------------------------------------


async def metric_total(client: httpx.AsyncClient, name: str) -> float:
    """The sum of every sample called ``name`` on /metrics (over all label values)."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    total = 0.0
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


async def assert_nothing_held(client: httpx.AsyncClient, within: float = 5.0) -> None:
    """No request on an engine and none queued, read from /metrics, within ``within`` seconds
    (a slot is released just after the response's last byte)."""
    held = (0.0, 0.0)

    async def nothing() -> bool:
        nonlocal held
        running = await metric_total(client, "llmserve_requests_in_flight")
        held = (running, await metric_total(client, "llmserve_queue_requests"))
        return held == (0, 0)

    try:
        await eventually(nothing, within, interval=0.05)
    except AssertionError:
        raise AssertionError(f"leaked: {held[0]} in flight, {held[1]} queued") from None


async def assert_still_serves(client: httpx.AsyncClient, within_s: float = 2.0) -> float:
    """A real completion is answered, and quickly; returns how long it took."""
    started = time.monotonic()
    response = await client.post("/v1/completions", json=PING_COMPLETION, timeout=within_s + 5)
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2
    assert elapsed < within_s, f"a plain completion took {elapsed:.2f} s"
    return elapsed


# --- the config of llmserve as a process -------------------------------------------------------


def simulated_config(
    *,
    auth: str = "{enabled: false}",
    extra: str = "",
    tokens_per_second: float = 2000,
    max_model_len: int = 512,
    log_level: str = "warning",
    more_models: str = "",
) -> str:
    """A YAML config with the simulated model "sim" (then ``more_models``, list items)."""
    return (
        f"log_level: {log_level}\n"
        f"auth: {auth}\n"
        f"{extra}"
        "models:\n"
        f"  - {{engine: simulated, name: sim, tokens_per_second: {tokens_per_second},"
        f" first_token_latency_s: 0.0, max_model_len: {max_model_len}}}\n"
        f"{more_models}"
    )
