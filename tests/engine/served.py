"""A real `vllm serve` managed by the gateway (the embedded model behind it): its config, its
port, and its own metrics, for the engine test modules that run one."""

from __future__ import annotations

import httpx

from llmserve.config import ManagedModel
from llmserve.engines.managed import ManagedServer
from llmserve.routing.replicated import ReplicatedEngine
from tests.conftest import RunningServer
from tests.observability.helpers import Scrape

SERVED = "smollm2-served"


def served_model() -> ManagedModel:
    return ManagedModel(
        engine="managed",
        name=SERVED,
        # Long enough for a 4,000-token request: a stream abandoned by a test must still be
        # running, minutes later, on a starved runner, unless the gateway aborts it.
        args=(
            "--max-model-len",
            "8192",
            # As the in-process default: tool calls parsed, so tool_choice "auto" is served.
            "--tool-call-parser",
            "xlam",
            "--enable-auto-tool-choice",
        ),
        startup_timeout_s=400,
    )


def served_port(server: RunningServer) -> int:
    replicated = server.models.get(SERVED)
    assert isinstance(replicated, ReplicatedEngine)
    (replica,) = replicated.replicas
    assert isinstance(replica, ManagedServer)
    return replica.port


async def vllm_serve_metric(server: RunningServer, name: str) -> float:
    """A counter or gauge summed over its series, read from the `vllm serve` process itself."""
    port = served_port(server)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        return Scrape.parse((await http.get("/metrics")).text).value(name)
