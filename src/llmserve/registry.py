"""The composition root of the engines: which engine serves which model name, its queue
(scheduling) and its replicas (routing). It sits above all three, below the app."""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
from pathlib import Path

from llmserve.config import ManagedModel, ModelConfig, SimulatedModel, UpstreamModel, VllmModel
from llmserve.engines.base import Engine
from llmserve.engines.managed import ManagedServer
from llmserve.engines.simulated import SimulatedEngine
from llmserve.engines.upstream.client import UpstreamEngine
from llmserve.errors import ModelNotFound
from llmserve.observability.collectors import GatewayGauges, ModelGauges, ReplicaGauges
from llmserve.routing.replicated import ReplicatedEngine
from llmserve.scheduling.admission import Admission
from llmserve.scheduling.queue_state import QueueLimits

log = logging.getLogger(__name__)


def build_engine(config: ModelConfig, cache_dir: Path) -> Engine:
    if isinstance(config, SimulatedModel):
        return SimulatedEngine(config)
    if isinstance(config, UpstreamModel):
        endpoints = config.endpoints
        upstreams = [UpstreamEngine(config, e.url, e.api_key) for e in endpoints]
        labels = [e.url for e in endpoints]
        return ReplicatedEngine(config.name, upstreams, labels, config.routing, config.health)
    if isinstance(config, ManagedModel):
        servers = [ManagedServer(config, i, cache_dir) for i in range(config.replicas)]
        labels = [s.label for s in servers]
        return ReplicatedEngine(config.name, servers, labels, config.routing, config.health)
    assert isinstance(config, VllmModel)
    # Imported here so that gateways without an in-process engine never import vLLM.
    from llmserve.engines.vllm_engine import VllmEngine

    return VllmEngine(config, cache_dir)


class ModelRegistry:
    """The served models, in configuration order; the first is the default for ``/generate``.
    Every lookup takes a model's name or one of its aliases."""

    def __init__(self, engines: dict[str, Engine], configs: dict[str, ModelConfig]) -> None:
        if not engines:
            raise ValueError("at least one model must be configured")
        self._engines = engines
        self._configs = configs
        self._canonical = {name: name for name in engines} | {
            alias: name for name in engines for alias in configs[name].aliases
        }
        self._admissions = {name: Admission(_queue_limits(configs[name])) for name in engines}
        self.draining = False
        # The last health check of each engine (False until one passed), for /metrics.
        self.healthy: dict[str, bool] = dict.fromkeys(engines, False)

    @classmethod
    def from_config(cls, models: list[ModelConfig], cache_dir: Path) -> ModelRegistry:
        engines = {m.name: build_engine(m, cache_dir) for m in models}
        return cls(engines, {m.name: m for m in models})

    @property
    def names(self) -> list[str]:
        return list(self._engines)

    @property
    def public_names(self) -> dict[str, str]:
        """Every name a client may ask for (names and aliases) → the model's name."""
        return dict(self._canonical)

    def canonical(self, name: str) -> str:
        """The model's name for one of its public names (404 for an unknown one)."""
        try:
            return self._canonical[name]
        except KeyError:
            raise ModelNotFound(
                f"The model '{name[:256]}' does not exist. Served models: "
                f"{', '.join(self._canonical)}",
                param="model",
            ) from None

    @property
    def default(self) -> str:
        return next(iter(self._engines))

    def get(self, name: str) -> Engine:
        return self._engines[self.canonical(name)]

    def admission(self, name: str) -> Admission:
        return self._admissions[self.canonical(name)]

    def config(self, name: str) -> ModelConfig:
        return self._configs[self.canonical(name)]

    def forwards_body(self, name: str) -> bool:
        """Whether the model's engine takes the client's body whole (an OpenAI server behind
        llmserve), so fields llmserve does not model are passed on, not refused."""
        return isinstance(self.config(name), (UpstreamModel, ManagedModel))

    def replicas(self, name: str) -> list[ReplicaGauges] | None:
        """Per-replica health and load of a replicated model; None for a single engine."""
        engine = self.get(name)
        return engine.status() if isinstance(engine, ReplicatedEngine) else None

    def gauges(self) -> GatewayGauges:
        """Queues, health and replicas as /metrics shows them (read at scrape time)."""
        models = []
        for name in self._engines:
            admission = self._admissions[name]
            limits = admission.state.limits
            replicas = tuple(self.replicas(name) or ())
            models.append(
                ModelGauges(
                    name=name,
                    healthy=self.healthy.get(name, False),
                    waiting=admission.queued,
                    waiting_tokens=admission.state.waiting_tokens,
                    in_flight=admission.in_flight,
                    max_waiting_requests=limits.max_waiting_requests,
                    max_waiting_tokens=limits.max_waiting_tokens,
                    max_in_flight=limits.max_in_flight,
                    replicas=replicas,
                )
            )
        return GatewayGauges(self.draining, tuple(models))

    def start_draining(self) -> None:
        """Stop admitting: new requests get 503; queued and running ones carry on."""
        self.draining = True
        for admission in self._admissions.values():
            admission.draining = True

    @property
    def active_requests(self) -> int:
        """Requests running or waiting, over every model."""
        return sum(a.in_flight + a.queued for a in self._admissions.values())

    async def start(self) -> None:
        """Start every engine. In-process vLLM engines load one after another (each sizes its
        KV cache from the memory it finds free); the others start meanwhile, so a slow or
        unreachable one holds back no other model."""

        async def one(name: str) -> None:
            log.info("starting engine for model %s", name)
            await self._engines[name].start()

        in_process = [n for n, c in self._configs.items() if isinstance(c, VllmModel)]

        async def in_process_in_turn() -> None:
            for name in in_process:
                await one(name)
            if in_process:
                _freeze_what_lives_on()

        others = [one(n) for n in self._configs if n not in in_process]
        await asyncio.gather(in_process_in_turn(), *others)

    async def health(self) -> dict[str, bool]:
        results = await asyncio.gather(*(e.check_health() for e in self._engines.values()))
        self.healthy = dict(zip(self._engines, results, strict=True))
        return dict(self.healthy)

    async def close(self) -> None:
        for engine in self._engines.values():
            await engine.close()


def _freeze_what_lives_on() -> None:
    """An in-process vLLM engine brings some 600,000 objects (vLLM, torch, the engine client)
    that live as long as the process. Left to the collector, every full collection walks them
    all: a stall of 0.3-0.5 s on these machines, for the event loop and every stream on it.
    Frozen, they are never walked again. The server also freezes at start-up
    (``server.DrainingServer.startup``), which catches vLLM's modules only because their import
    happens to run first; the engine is built after it. This does not depend on that order,
    and covers processes that serve the app without that start-up (the tests' servers)."""
    gc.collect()  # what is garbage now is not kept forever
    gc.freeze()
    # Thawed at exit, so that the interpreter's last collection still finalises them: native
    # extensions (triton's, under vLLM) otherwise report their objects leaked on shutdown.
    atexit.register(gc.unfreeze)


def _queue_limits(config: ModelConfig) -> QueueLimits:
    a = config.admission
    return QueueLimits(
        max_waiting_requests=a.max_waiting_requests,
        max_waiting_tokens=a.max_waiting_tokens,
        max_in_flight=a.max_in_flight,
        group_window_s=a.group_window_s,
        group_buckets=a.group_buckets,
    )
