"""Shared fixtures: a real uvicorn server on 127.0.0.1 (real sockets, incremental delivery)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from aiohttp import web

from llmserve.app import create_app
from llmserve.config import AdmissionConfig, Limits, Settings, SimulatedModel
from llmserve.engines.registry import ModelRegistry
from llmserve.engines.simulated import SimulatedEngine
from llmserve.server import uvicorn_config

# The suite runs with API keys off unless a test turns them on (tests/auth does, with its own
# keys file); servers started as subprocesses inherit this too.
os.environ["LLMSERVE_AUTH__ENABLED"] = "false"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def start_openai_server(
    port: int, generate: Handler, health: Handler, shutdown_timeout_s: float = 0.5
) -> web.AppRunner:
    """A fake OpenAI-compatible server on loopback: the generation routes, embeddings,
    responses and /health. The port may be reused at once, so a test can stop it and start it
    again in the same place."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", generate)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/embeddings", generate)
    app.router.add_post("/v1/responses", generate)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    return runner


@dataclass
class RunningServer:
    url: str
    settings: Settings
    models: ModelRegistry

    def engine(self, name: str) -> Any:
        return self.models.get(name)


def simulated_models(
    tokens_per_second: float = 200,
    first_token_latency_s: float = 0.01,
    slow_admission: AdmissionConfig | None = None,
) -> list[SimulatedModel]:
    """ "sim", a 256-token context at ``tokens_per_second``, and "slow" (10 tokens/s)."""
    return [
        SimulatedModel(
            engine="simulated",
            name="sim",
            tokens_per_second=tokens_per_second,
            first_token_latency_s=first_token_latency_s,
            max_model_len=256,
        ),
        SimulatedModel(
            engine="simulated",
            name="slow",
            tokens_per_second=10,
            first_token_latency_s=0.05,
            max_model_len=4096,
            admission=slow_admission or AdmissionConfig(),
        ),
    ]


def simulated_settings(**limits: Any) -> Settings:
    return Settings(models=simulated_models(), limits=Limits(**limits))


@asynccontextmanager
async def serve(settings: Settings, port: int | None = None) -> AsyncIterator[RunningServer]:
    """Run the real app under uvicorn (httptools) in this event loop, on a loopback port: a
    free one, or ``port`` (a server that comes back where it was)."""
    registry = ModelRegistry.from_config(settings.models, settings.cache_dir)
    app = create_app(settings, registry)
    port = port or free_port()
    config = uvicorn_config(app, "127.0.0.1", port, "warning", settings.limits)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", settings, registry)
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def sim_server() -> AsyncIterator[RunningServer]:
    """The gateway with two simulated engines: "sim" (fast, 256-token context) and "slow"."""
    async with serve(simulated_settings()) as running:
        yield running


def sim_engine(running: RunningServer, name: str = "sim") -> SimulatedEngine:
    engine = running.models.get(name)
    assert isinstance(engine, SimulatedEngine)
    return engine
