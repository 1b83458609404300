"""Authentication for every route that is not explicitly public (pure ASGI, so 404s and any
route added later are protected too). The decoded path is what routes match on, so the same path
is checked here whatever its encoding."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from llmserve.auth.keys import KeyStore
from llmserve.auth.principal import Principal
from llmserve.observability.metrics import count_rejection
from llmserve.wire.errors import error_body, json_response


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: KeyStore, public_paths: tuple[str, ...]) -> None:
        self.app = app
        self.keys = keys
        self.public = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        presented = _bearer(scope)
        if scope["type"] == "websocket":
            if presented is None or self.keys.lookup(presented) is None:
                await send({"type": "websocket.close", "code": 1008})  # policy violation
                return
            await self.app(scope, receive, send)
            return
        if presented is None:
            await _deny(scope, receive, send, "missing API key: send 'Authorization: Bearer KEY'")
            return
        record = self.keys.lookup(presented)
        if record is None:
            await _deny(scope, receive, send, "invalid API key (unknown, revoked or expired)")
            return
        scope.setdefault("state", {})["principal"] = Principal.from_key(record)
        await self.app(scope, receive, send)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


async def _deny(scope: Scope, receive: Receive, send: Send, message: str) -> None:
    count_rejection("auth", "unauthenticated")
    body = error_body(message, "authentication_error", code="invalid_api_key")
    response = json_response(401, body, {"WWW-Authenticate": "Bearer"})
    await response(scope, receive, send)
