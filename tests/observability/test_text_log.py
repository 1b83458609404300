"""The default text log carries the fields the JSON one has: an access line names method, path,
status, duration and model, not just "access"."""

from __future__ import annotations

import logging

import httpx
import pytest

from llmserve.observability import logs
from llmserve.observability.logs import TextFormatter
from tests.conftest import serve, simulated_settings


def test_extra_fields_follow_the_message_before_a_traceback() -> None:
    formatter = TextFormatter("%(levelname)s %(name)s: %(message)s")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, None)
        record.exc_info = __import__("sys").exc_info()
    record.__dict__.update(path="/v1/a b", status=500, key=None)
    first, *rest = formatter.format(record).splitlines()
    assert first == "ERROR x: failed path='/v1/a b' status=500"  # None left out, spaces quoted
    assert rest[0].startswith("Traceback") and rest[-1] == "ValueError: boom"


async def test_an_access_line_in_text_says_what_happened(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("info", "text")
    try:
        async with serve(simulated_settings()) as server, httpx.AsyncClient() as client:
            body = {"model": "sim", "prompt": "hi", "max_tokens": 3}
            response = await client.post(f"{server.url}/v1/completions", json=body)
            assert response.status_code == 200
    finally:
        logging.getLogger().handlers.clear()
    lines = [line for line in capsys.readouterr().err.splitlines() if "llmserve.access" in line]
    assert len(lines) == 1, lines
    line = lines[0]
    request_id = response.headers["x-request-id"]
    for field in (
        f"request_id={request_id}",
        "method=POST",
        "path=/v1/completions",
        "status=200",
        "model=sim",
        "completion_tokens=3",
        "outcome=ok",
        "duration_ms=",
    ):
        assert field in line, line
