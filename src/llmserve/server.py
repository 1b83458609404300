"""Running the app under uvicorn (uvloop + httptools), with a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from llmserve.app import create_app
from llmserve.config import Limits, Settings
from llmserve.http_protocol import guarded_protocol
from llmserve.observability import logs, tracing
from llmserve.registry import ModelRegistry

log = logging.getLogger(__name__)

# After the drain, what is still running is cancelled (and so aborted) within this much time.
_CANCEL_GRACE_S = 1
# The cyclic GC's young-generation threshold (CPython's default is 700 allocations). A request
# allocates a few hundred objects, nearly all freed by reference counting, so the default ran a
# collection every few requests; measured, that was 10-20 % of the gateway's CPU per request
# (benchmarks/results/overhead-profile.md). Older generations: every 20 and 10 of those.
_GC_THRESHOLDS = (50_000, 20, 10)


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: stop admitting (readiness fails, new requests get 503), keep
    serving what runs or waits for up to ``drain_timeout_s``, then shut down; what is still
    running is cancelled, which aborts its engine requests. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, models: ModelRegistry, drain_timeout_s: float):
        super().__init__(config)
        self._models = models
        self._drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        # What exists now (modules, the app, its routes and schemas) lives as long as the
        # process: frozen, the collector never walks it again.
        gc.collect()
        gc.freeze()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._models.draining or self._loop is None:
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self.force_exit = True
            return
        # Runs as a signal handler between bytecodes: only set flags, and hand over to the loop.
        self._models.start_draining()
        self._loop.call_soon_threadsafe(self._start_drain, sig, frame)

    def _start_drain(self, sig: int, frame: FrameType | None) -> None:
        self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit(sig, frame))

    async def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
        log.warning(
            "draining: %d request(s) in flight, waiting up to %g s",
            self._models.active_requests,
            self._drain_timeout_s,
        )
        deadline = time.monotonic() + self._drain_timeout_s
        # Polled: a drain happens once per process, not per request.
        while self._models.active_requests and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if self._models.active_requests:
            log.warning("drain timeout: aborting %d request(s)", self._models.active_requests)
        super().handle_exit(sig, frame)


def uvicorn_config(
    app: ASGIApp, host: str, port: int, log_level: str, limits: Limits | None = None
) -> uvicorn.Config:
    """How llmserve runs under uvicorn; the tests' in-process servers use the same options."""
    limits = limits or Limits()
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        # httptools, with bounds on request heads (size and time) that uvicorn lacks.
        http=guarded_protocol(limits.max_header_bytes, limits.header_timeout_s),
        log_level=log_level,
        log_config=None,  # ours (logs.configure): JSON lines when asked, uvicorn's included
        access_log=False,  # ours is richer: key, model, tokens, outcome
        timeout_keep_alive=30,
        server_header=False,  # no version banner for scanners
        timeout_graceful_shutdown=_CANCEL_GRACE_S,
    )


def serve(settings: Settings) -> int:
    """Serve until stopped; returns the process exit code (1 if an engine failed to load)."""
    logs.configure(settings.log_level, settings.observability.log_format)
    tracing.setup(settings.observability.otlp_endpoint, settings.observability.service_name)
    failed = False
    server: uvicorn.Server | None = None

    def on_fatal() -> None:
        nonlocal failed
        failed = True
        if server is not None:
            server.should_exit = True

    models = ModelRegistry.from_config(settings.models, settings.cache_dir)
    app = create_app(settings, models, on_fatal=on_fatal)
    config = uvicorn_config(app, settings.host, settings.port, settings.log_level, settings.limits)
    server = DrainingServer(config, models, settings.drain_timeout_s)
    gc.set_threshold(*_GC_THRESHOLDS)
    server.run()
    return 1 if failed else 0
