"""Response headers a security scan expects on an API, on every answer (errors and streams too).

Pure ASGI: it touches only the ``http.response.start`` message, so a streamed token costs one
type check here, not a Response rebuild."""

from __future__ import annotations

from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Nothing here is meant to be cached, framed, sniffed into another type, or sent on as a referrer.
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
# The API serves no documents, so no script, style or frame may load; the interactive docs pages
# (which load Swagger UI / ReDoc from a CDN) are the one exception and get no CSP.
_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_API_HEADERS = (*SECURITY_HEADERS, _CSP)
_DOC_PAGES = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = SECURITY_HEADERS if scope["path"] in _DOC_PAGES else _API_HEADERS

        # Hands back send's awaitable (see AccessLogMiddleware): body messages pass untouched.
        def send_with_headers(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                # Ours replace any the app set (SSE's no-cache becomes no-store).
                ours = {name for name, _ in extra}
                message["headers"] = [
                    *(h for h in message.get("headers", ()) if h[0].lower() not in ours),
                    *extra,
                ]
            return send(message)

        await self.app(scope, receive, send_with_headers)
