"""OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}``, and the JSON
response that carries it: what every layer that refuses a request sends."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import Response

from llmserve.errors import LLMServeError


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def body_for(exc: LLMServeError) -> dict[str, Any]:
    return error_body(exc.message, exc.error_type, exc.param, exc.code)


def json_response(
    status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")
