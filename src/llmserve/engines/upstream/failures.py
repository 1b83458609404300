"""How an upstream's failures are named: each becomes an llmserve error whose ``code`` says what
went wrong (``upstream_unreachable``, ``first_token_timeout``, ...), for failover, metrics and
the client. Upstream messages reach clients, so the key sent upstream is redacted from them."""

from __future__ import annotations

import math

import aiohttp
import orjson

from llmserve.errors import (
    EngineFailure,
    EngineTimeout,
    EngineUnavailable,
    InvalidRequest,
    LLMServeError,
)


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "[redacted]") if secret else text


def unreachable(exc: aiohttp.ClientError) -> EngineUnavailable:
    return EngineUnavailable(
        f"the upstream engine is unreachable ({type(exc).__name__})", code="upstream_unreachable"
    )


def no_token(started: bool) -> EngineTimeout:
    if started:
        return EngineTimeout(
            "the upstream engine stopped sending tokens", code="between_tokens_timeout"
        )
    return EngineTimeout("the upstream engine sent no token in time", code="first_token_timeout")


def interrupt(response: aiohttp.ClientResponse, exc: BaseException) -> None:
    """Close the upstream stream and wake a reader blocked on it (closing alone does not)."""
    response.content.set_exception(exc)
    response.close()


def _retry_after(value: str | None) -> int:
    """The upstream's Retry-After in whole seconds (1 when absent or an HTTP date)."""
    try:
        return max(1, math.ceil(float(value or "1")))
    except ValueError:
        return 1


async def upstream_error(response: aiohttp.ClientResponse, secret: str | None) -> LLMServeError:
    param = code = None
    try:
        error = (await response.json(content_type=None, loads=orjson.loads))["error"]
        message = redact(str(error["message"]), secret)
        param, code = error.get("param"), error.get("code")
    except Exception:
        message = f"status {response.status}"
    if response.status in (400, 422):
        return InvalidRequest(
            f"the upstream engine rejected the request: {message}",
            param=param if isinstance(param, str) else None,
            code=code if isinstance(code, str) else None,
        )
    if response.status in (404,):
        return EngineFailure(
            f"the upstream engine does not serve this model: {message}", code="upstream_http_error"
        )
    if response.status in (429, 503):
        return EngineUnavailable(
            f"the upstream engine is overloaded: {message}",
            code="upstream_overloaded",
            retry_after_s=_retry_after(response.headers.get("Retry-After")),
        )
    return EngineFailure(f"the upstream engine failed: {message}", code="upstream_http_error")
