"""The FastAPI application: routes, error handlers, body limit, and the engines' lifetime."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from llmserve import __version__
from llmserve.api import generation_routes, openai_routes, simple_routes, tokenize_routes
from llmserve.api.access_log import AccessLogMiddleware
from llmserve.api.body_limit import BodySizeLimit
from llmserve.api.errors import install_error_handlers
from llmserve.api.openapi import install_openapi
from llmserve.api.security import SecurityHeaders
from llmserve.api.server_send import KeepServerSend
from llmserve.auth.keys import KeyStore
from llmserve.auth.middleware import AuthMiddleware
from llmserve.config import Settings
from llmserve.limits.limiter import RateLimiter
from llmserve.observability.collectors import QueueCollector
from llmserve.observability.gpu import GpuCollector
from llmserve.registry import ModelRegistry
from llmserve.serving.gateway import Gateway

log = logging.getLogger(__name__)


class LLMServeApp(FastAPI):
    def build_middleware_stack(self) -> ASGIApp:
        # Outside Starlette's own error middleware too, so it keeps the server's send itself.
        return KeepServerSend(super().build_middleware_stack())


def create_app(
    settings: Settings,
    models: ModelRegistry | None = None,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """Build the app. Engines load in the background so /health answers while they do;
    /ready turns 200 once every engine loaded and answers. ``on_fatal`` runs if loading fails."""
    registry = models or ModelRegistry.from_config(settings.models, settings.cache_dir)
    # A concurrency lease outlives any request, so a crashed replica's slots expire on their own.
    limiter = RateLimiter.from_config(settings.rate_limits, settings.limits.request_timeout_s + 60)
    keys = _key_store(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        background = [
            asyncio.create_task(_load(registry, on_fatal, settings, keys)),
            asyncio.create_task(_watch_health(registry)),
        ]
        if keys is not None:
            background.append(asyncio.create_task(_reload_keys(keys, settings)))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await registry.close()
            await limiter.close()

    # No slash redirects: their Location is built from the Host header, which a client controls.
    app = LLMServeApp(
        title="llmserve", version=__version__, lifespan=lifespan, redirect_slashes=False
    )
    collectors = CollectorRegistry(auto_describe=True)
    collectors.register(QueueCollector(registry.gauges))
    collectors.register(GpuCollector())
    app.state.gateway = Gateway(
        settings=settings, models=registry, limiter=limiter, metrics=collectors
    )
    # First: the router tries routes in order, and these take nearly all the traffic.
    app.router.routes[0:0] = generation_routes.ROUTES
    app.include_router(openai_routes.router)
    app.include_router(tokenize_routes.router)
    app.include_router(simple_routes.router)
    install_error_handlers(app)
    install_openapi(app)
    if keys is not None:
        app.add_middleware(AuthMiddleware, keys=keys, public_paths=settings.auth.public_paths)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.limits.max_body_bytes,
        timeout_s=settings.limits.body_timeout_s,
    )
    if settings.cors.allow_origins:
        # Outside auth, so a preflight (which carries no key) is answered.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors.allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=list(settings.cors.allow_headers),
            max_age=settings.cors.max_age_s,
        )
    app.add_middleware(SecurityHeaders)
    # Added last, so it runs first: every answer, refusals included, gets an id and a log line.
    app.add_middleware(AccessLogMiddleware, enabled=settings.observability.access_log)
    return app


def _key_store(settings: Settings) -> KeyStore | None:
    if not settings.auth.enabled:
        log.warning(
            "AUTHENTICATION IS OFF (auth.enabled: false): anyone who can reach %s:%d can use "
            "every model without limits",
            settings.host,
            settings.port,
        )
        return None
    keys = KeyStore(settings.keys_path)
    if not len(keys):
        log.warning(
            "no API keys in %s: every request will get 401. Create one with "
            "'llmserve keys create --name NAME'",
            settings.keys_path,
        )
    return keys


async def _watch_health(registry: ModelRegistry, interval_s: float = 5.0) -> None:
    """Keeps llmserve_engine_healthy current even when nobody probes /ready."""
    while True:
        await registry.health()
        await asyncio.sleep(interval_s)


async def _reload_keys(keys: KeyStore, settings: Settings) -> None:
    """Picks up created and revoked keys without a restart."""
    while True:
        await asyncio.sleep(settings.auth.reload_interval_s)
        keys.reload()


async def _load(
    registry: ModelRegistry,
    on_fatal: Callable[[], None] | None,
    settings: Settings,
    keys: KeyStore | None,
) -> None:
    try:
        await registry.start()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("an engine failed to start; the server cannot serve")
        if on_fatal is not None:
            on_fatal()
        raise
    log.info("%s", ready_line(settings, registry, keys))


def ready_line(settings: Settings, registry: ModelRegistry, keys: KeyStore | None) -> str:
    """The last line of a start: where it listens, what it serves, whether keys are on (it
    follows engines' own output, which can run to dozens of lines)."""
    aliases: dict[str, list[str]] = {name: [] for name in registry.names}
    for public, name in registry.public_names.items():
        if public != name:
            aliases[name].append(public)
    models = ", ".join(
        name + (f" (aliases: {', '.join(more)})" if more else "") for name, more in aliases.items()
    )
    if keys is None:
        auth = "API keys OFF: anyone who can reach the port can use every model"
    else:
        auth = f"API keys on ({len(keys)} in {settings.keys_path})"
    return f"llmserve ready on http://{settings.host}:{settings.port}, serving {models}; {auth}"
