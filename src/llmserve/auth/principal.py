"""The principal: the tenant a request is queued, limited and accounted as.

API keys (with names, weights and priorities from their config) are not built yet. Until they are,
each distinct bearer token is its own tenant, so fair queueing already separates clients; requests
without a token share the tenant "anonymous". The token itself is never kept: only a hash prefix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from starlette.requests import Request


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    # Share of the queue relative to other tenants (weighted fair queueing).
    weight: float = 1.0
    # Priority class: lower runs first. A request may lower its own urgency, never raise it.
    priority: int = 0


ANONYMOUS = Principal("anonymous")


def principal_for(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return ANONYMOUS
    digest = hashlib.sha256(token.strip().encode()).hexdigest()[:12]
    return Principal(f"token-{digest}")
