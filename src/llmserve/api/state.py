"""What the routes share: built once at start and reached through ``request.app.state``."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from starlette.requests import Request

from llmserve.config import Settings
from llmserve.engines.registry import ModelRegistry
from llmserve.limits.limiter import RateLimiter


@dataclass(frozen=True, slots=True)
class Gateway:
    settings: Settings
    models: ModelRegistry
    limiter: RateLimiter
    # This app's scrape-time collectors (queues, GPUs); counters live in the default registry.
    metrics: CollectorRegistry


async def gateway(request: Request) -> Gateway:
    # async on purpose: FastAPI runs a plain-def dependency on a worker thread, a thread hop
    # per request for a dictionary lookup.
    state: Gateway = request.app.state.gateway
    return state
