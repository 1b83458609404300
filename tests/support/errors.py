"""Checking an OpenAI error body in one place."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Response(Protocol):
    """An httpx response, or the one the OpenAI SDK carries (from its own copy of httpx)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def text(self) -> str: ...
    def json(self) -> Any: ...


def assert_openai_error(
    response_or_body: Response | Mapping[str, Any] | bytes | str,
    status: int | None = None,
    *,
    type: str | None = None,  # shadows the builtin: the OpenAI field's own name
    code: str | None = None,
    param: str | None = None,
    message_contains: str | None = None,
) -> dict[str, Any]:
    """Assert ``{"error": {"message": str, "type": str, "param": ..., "code": ...}}`` and the
    given fields (a field left as None is not checked); return the error object.

    A response must also be JSON with the given status; a body alone cannot carry a status."""
    body = _body(response_or_body, status)
    assert isinstance(body, Mapping) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict), body
    assert set(error) == {"message", "type", "param", "code"}, error
    assert "Traceback" not in json.dumps(body), body  # messages are sanitised
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    for name, expected in (("type", type), ("code", code), ("param", param)):
        assert expected is None or error[name] == expected, (name, expected, error)
    if message_contains is not None:
        assert message_contains in error["message"], (message_contains, error)
    return error


def _body(response_or_body: Response | Mapping[str, Any] | bytes | str, status: int | None) -> Any:
    if isinstance(response_or_body, Response):
        response = response_or_body
        if status is not None:
            assert response.status_code == status, (response.status_code, response.text)
        assert response.headers.get("content-type", "").startswith("application/json"), (
            response.headers.get("content-type"),
            response.text,
        )
        return response.json()
    assert status is None, "only a response carries a status"
    if isinstance(response_or_body, bytes | str):
        return json.loads(response_or_body)
    return response_or_body
