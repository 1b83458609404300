"""What the routes share: built once at start and reached through ``request.app.state``."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from llmserve.config import Settings
from llmserve.engines.registry import ModelRegistry
from llmserve.limits.limiter import RateLimiter


@dataclass(frozen=True, slots=True)
class Gateway:
    settings: Settings
    models: ModelRegistry
    limiter: RateLimiter


def gateway(request: Request) -> Gateway:
    state: Gateway = request.app.state.gateway
    return state
