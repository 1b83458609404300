"""Shared fixtures: the gateway with the simulated engines, on a real loopback socket (started
by tests/support/gateway.py, which also runs gateways as processes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from llmserve.config import (
    AdmissionConfig,
    AuthConfig,
    Limits,
    ModelConfig,
    Settings,
    SimulatedModel,
)
from llmserve.engines.simulated import SimulatedEngine
from tests.support.gateway import RunningServer, free_port, serve

# Re-exported: many test modules import these from here.
__all__ = [
    "RunningServer",
    "free_port",
    "serve",
    "sim_engine",
    "simulated_models",
    "simulated_settings",
]


def simulated_models(
    tokens_per_second: float = 200,
    first_token_latency_s: float = 0.01,
    slow_admission: AdmissionConfig | None = None,
) -> list[ModelConfig]:
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
    """The simulated models with these limits, API keys off."""
    return Settings(
        models=simulated_models(), limits=Limits(**limits), auth=AuthConfig(enabled=False)
    )


@pytest.fixture
async def sim_server() -> AsyncIterator[RunningServer]:
    """The gateway with two simulated engines: "sim" (fast, 256-token context) and "slow"."""
    async with serve(simulated_settings()) as running:
        yield running


def sim_engine(running: RunningServer, name: str = "sim") -> SimulatedEngine:
    engine = running.models.get(name)
    assert isinstance(engine, SimulatedEngine)
    return engine
