"""The one error hierarchy of llmserve.

Each class carries its HTTP status and OpenAI error ``type``; ``api/errors.py`` turns them into
responses in exactly one place. Messages are written for clients: no tracebacks, paths or keys.
"""

from __future__ import annotations

from typing import ClassVar

from llmserve.quota import QuotaSnapshot


class LLMServeError(Exception):
    """Base of every error a client may see."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    # Every error a client sees has a code (a stable string to branch on); messages may change.
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code: str = code if code is not None else self.default_code
        # When to come back, in whole seconds (Retry-After, rendered by api.headers), if known.
        self.retry_after_s = retry_after_s


class InvalidRequest(LLMServeError):
    status = 400
    error_type = "invalid_request_error"
    default_code = "invalid_value"


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class BodyTooLarge(LLMServeError):
    status = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class BodyTimeout(LLMServeError):
    status = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class ModelNotFound(LLMServeError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class EngineUnavailable(LLMServeError):
    """The engine cannot take work now (not loaded, dead, or draining)."""

    status = 503
    error_type = "server_error"
    default_code = "engine_unavailable"


class EngineFailure(LLMServeError):
    """The engine failed while serving a request it had accepted."""

    status = 502
    error_type = "server_error"
    default_code = "engine_error"


class EngineTimeout(LLMServeError):
    status = 504
    error_type = "server_error"
    default_code = "timeout"


class ClientDisconnected(LLMServeError):
    """The client went away; the status is for logs, nobody reads the response."""

    status = 499
    error_type = "invalid_request_error"
    default_code = "client_disconnected"


class Overloaded(LLMServeError):
    """The server cannot take this request now; ``Retry-After`` says when to come back."""

    status = 503
    error_type = "server_error"
    default_code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int, code: str | None = None) -> None:
        super().__init__(message, code=code, retry_after_s=retry_after_s)


class QueueFull(Overloaded):
    default_code = "queue_full"


class QueueTimeout(Overloaded):
    default_code = "queue_timeout"


class RateLimited(LLMServeError):
    """This key's quota: come back after ``Retry-After``."""

    status = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retry_after_s: int | None = None,
        quota: QuotaSnapshot | None = None,
    ) -> None:
        super().__init__(message, code=code, retry_after_s=retry_after_s)
        self.quota = quota


class PermissionDenied(LLMServeError):
    status = 403
    error_type = "permission_error"
    default_code = "model_not_allowed"


class LimiterUnavailable(Overloaded):
    """The rate-limit store cannot be reached and the configured choice is to fail closed."""

    default_code = "rate_limiter_unavailable"
