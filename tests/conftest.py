"""Shared fixtures: a real uvicorn server on 127.0.0.1 (real sockets, incremental delivery)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn

from llmserve.app import create_app
from llmserve.config import Limits, Settings, SimulatedModel
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


@dataclass
class RunningServer:
    url: str
    settings: Settings
    models: ModelRegistry

    def engine(self, name: str) -> Any:
        return self.models.get(name)


def simulated_settings(**limits: Any) -> Settings:
    return Settings(
        models=[
            SimulatedModel(
                engine="simulated",
                name="sim",
                tokens_per_second=200,
                first_token_latency_s=0.01,
                max_model_len=256,
            ),
            SimulatedModel(
                engine="simulated",
                name="slow",
                tokens_per_second=10,
                first_token_latency_s=0.05,
                max_model_len=4096,
            ),
        ],
        limits=Limits(**limits),
    )


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
