"""What every request is served with, built once at start (``app.create_app``): the settings,
the models, the rate limiter and the scrape-time collectors."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from llmserve.config import Settings
from llmserve.limits.limiter import RateLimiter
from llmserve.registry import ModelRegistry


@dataclass(frozen=True, slots=True)
class Gateway:
    settings: Settings
    models: ModelRegistry
    limiter: RateLimiter
    # This app's scrape-time collectors (queues, GPUs); counters live in the default registry.
    metrics: CollectorRegistry
