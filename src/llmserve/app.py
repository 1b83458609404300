"""The FastAPI application: routes, error handlers, body limit, and the engines' lifetime."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from llmserve import __version__
from llmserve.api import openai_routes, simple_routes
from llmserve.api.body_limit import BodySizeLimit
from llmserve.api.errors import install_error_handlers
from llmserve.api.state import Gateway
from llmserve.config import Settings
from llmserve.engines.registry import ModelRegistry

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    models: ModelRegistry | None = None,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the app. Engines load in the background so /health answers while they do;
    /ready turns 200 once every engine loaded and answers. ``on_fatal`` runs if loading fails."""
    registry = models or ModelRegistry.from_config(settings.models, settings.cache_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_load(registry, on_fatal))
        app.state.loading = loading
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await registry.close()

    app = FastAPI(title="llmserve", version=__version__, lifespan=lifespan)
    app.state.gateway = Gateway(settings=settings, models=registry)
    app.include_router(openai_routes.router)
    app.include_router(simple_routes.router)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.limits.max_body_bytes)
    return app


async def _load(registry: ModelRegistry, on_fatal: Callable[[], None] | None) -> None:
    try:
        await registry.start()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("an engine failed to start; the server cannot serve")
        if on_fatal is not None:
            on_fatal()
        raise
    log.info("all engines started: %s", ", ".join(registry.names))
