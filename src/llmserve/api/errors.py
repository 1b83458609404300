"""Every error becomes an OpenAI error body here, and only here."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from llmserve.api.headers import error_headers
from llmserve.auth.principal import principal_for
from llmserve.errors import ClientDisconnected, LLMServeError
from llmserve.observability.metrics import count_rejection
from llmserve.observability.reasons import reason_for
from llmserve.validation.schema_errors import invalid_request
from llmserve.wire.errors import body_for, error_body, json_response

log = logging.getLogger(__name__)

_HTTP_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
# Starlette's own refusals (no route, wrong method): each gets a code like llmserve's errors.
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


async def _llmserve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LLMServeError)
    # A client that left was not refused: its request is counted once, as a disconnect, by the
    # request's own record (llmserve_requests_total), where it had one.
    if not isinstance(exc, ClientDisconnected):
        count_rejection(reason_for(exc), principal_for(request).name)
    return json_response(exc.status, body_for(exc), error_headers(exc))


async def _client_gone(request: Request, exc: Exception) -> Response:
    """The client disconnected while sending its body: nobody reads this answer."""
    return json_response(499, body_for(ClientDisconnected("the client disconnected")))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    count_rejection("validation", principal_for(request).name)
    return json_response(400, body_for(invalid_request(exc.errors())))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    count_rejection("validation", principal_for(request).name)
    error_type = _HTTP_TYPES.get(exc.status_code, "invalid_request_error")
    code = _HTTP_CODES.get(exc.status_code, "invalid_request")
    body = error_body(str(exc.detail), error_type, code=code)
    return json_response(exc.status_code, body, exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    count_rejection("internal", principal_for(request).name)
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return json_response(
        500, error_body("internal server error", "server_error", code="internal_error")
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LLMServeError, _llmserve_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
