"""The principal: the tenant a request is queued, limited and accounted as."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from starlette.requests import Request

from llmserve.auth.keys import KeyRecord
from llmserve.errors import PermissionDenied


@dataclass(frozen=True, slots=True)
class Principal:
    # The key's name: what logs and metrics show. Never the key itself.
    name: str
    models: tuple[str, ...] = ("*",)
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    # Share of the queue relative to other tenants (weighted fair queueing).
    weight: float = 1.0
    # Priority class: lower runs first. A request may lower its own urgency, never raise it.
    priority: int = 0
    # Who shares a queue fairly with whom; the key's name unless auth is off (see below).
    tenant: str = ""

    def __post_init__(self) -> None:
        if not self.tenant:
            object.__setattr__(self, "tenant", self.name)

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    @property
    def limited(self) -> bool:
        return any(limit is not None for limit in (self.rpm, self.tpm, self.max_concurrent))

    @classmethod
    def from_key(cls, record: KeyRecord) -> Principal:
        return cls(
            record.name,
            record.models,
            record.rpm,
            record.tpm,
            record.max_concurrent,
            record.weight,
            record.priority,
        )


# With auth switched off, requests without a bearer token share this tenant, without limits.
ANONYMOUS = Principal("anonymous")


def principal_for(request: Request) -> Principal:
    """The authenticated key's principal. With auth off, every request is "anonymous" in logs
    and metrics (bounded labels), but each distinct bearer token is its own queue tenant (a hash
    prefix, never the token), so fair queueing still separates clients."""
    principal = request.scope.get("state", {}).get("principal")
    if isinstance(principal, Principal):
        return principal
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return ANONYMOUS
    digest = hashlib.sha256(token.strip().encode()).hexdigest()[:12]
    return Principal(ANONYMOUS.name, tenant=f"token-{digest}")


def authorize(request: Request, model: str, canonical: str | None = None) -> None:
    """403 unless the caller's key may use ``model`` (by that name or its model's name)."""
    principal = principal_for(request)
    if not principal.allows(model) and not (canonical and principal.allows(canonical)):
        raise PermissionDenied(f"this API key may not use the model '{model[:256]}'", param="model")
