"""One access line per request (``llmserve.access``), every answer included, refusals too.

The line carries the request id (``X-Request-ID`` accepted from the client when it is sane,
generated otherwise, and echoed on the response), method, path, status, duration, the key's name,
the model, token counts and the outcome. Never the key, never the prompt.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmserve.auth.principal import Principal

access_log = logging.getLogger("llmserve.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 0

        # A plain function handing back send's awaitable: no coroutine of its own for each of
        # a stream's body messages, which this only passes on.
        def send_with_id(message: Message) -> Awaitable[None]:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            return send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.enabled:
                access_log.info("access", extra=_fields(scope, request_id, status, started))


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate = bytes(value).decode("latin-1")
            if _REQUEST_ID.match(candidate):
                return candidate
    return os.urandom(16).hex()  # uuid4 without building a UUID object


def _fields(scope: Scope, request_id: str, status: int, started: float) -> dict[str, object]:
    state = scope.get("state", {})
    principal = state.get("principal")
    fields: dict[str, object] = {
        "request_id": request_id,
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        "key": principal.name if isinstance(principal, Principal) else None,
    }
    record = state.get("record")
    if record is not None:
        fields.update(
            model=record.generation.model,
            generation_id=record.generation.request_id,
            prompt_tokens=record.prompt_tokens or record.generation.prompt_tokens,
            completion_tokens=record.completion_tokens,
            outcome=record.status,
            ttft_ms=None
            if record.first_token_at is None
            else round((record.first_token_at - record.arrived) * 1000, 2),
            queue_wait_ms=None
            if record.queue_wait_s is None
            else round(record.queue_wait_s * 1000, 2),
        )
    return fields
