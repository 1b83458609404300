"""Queue gauges, read at scrape time from the live admission state, so the request path pays
nothing to keep them up to date."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass(frozen=True, slots=True)
class ReplicaGauges:
    label: str
    healthy: bool
    outstanding: int
    load: float = 0.0
    engine_requests: float | None = None  # None: the engine does not report (not exported)
    kv_cache_usage: float | None = None


@dataclass(frozen=True, slots=True)
class ModelGauges:
    """One model's queue and health at scrape time (``registry.ModelRegistry.gauges``)."""

    name: str
    healthy: bool
    waiting: int
    waiting_tokens: int
    in_flight: int
    max_waiting_requests: int
    max_waiting_tokens: int
    max_in_flight: int
    replicas: tuple[ReplicaGauges, ...] = ()


@dataclass(frozen=True, slots=True)
class GatewayGauges:
    draining: bool
    models: tuple[ModelGauges, ...]


class QueueCollector(Collector):
    """Reads the gauges through a function, so observability knows nothing of the registry."""

    def __init__(self, read: Callable[[], GatewayGauges]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        waiting = GaugeMetricFamily(
            "llmserve_queue_requests", "Requests waiting in the gateway's queue.", labels=["model"]
        )
        tokens = GaugeMetricFamily(
            "llmserve_queue_tokens",
            "Tokens (prompt + max_tokens * n) of the requests waiting in the queue.",
            labels=["model"],
        )
        running = GaugeMetricFamily(
            "llmserve_requests_in_flight", "Requests running on the engine.", labels=["model"]
        )
        capacity = GaugeMetricFamily(
            "llmserve_queue_capacity_requests",
            "The queue's bound in waiting requests.",
            labels=["model"],
        )
        capacity_tokens = GaugeMetricFamily(
            "llmserve_queue_capacity_tokens",
            "The queue's bound in waiting tokens.",
            labels=["model"],
        )
        max_in_flight = GaugeMetricFamily(
            "llmserve_max_in_flight", "Requests allowed on the engine at once.", labels=["model"]
        )
        draining = GaugeMetricFamily("llmserve_draining", "1 while the server drains.")
        healthy = GaugeMetricFamily(
            "llmserve_engine_healthy",
            "1 when the model's engine passed its last health check (every few seconds).",
            labels=["model"],
        )
        replica_up = GaugeMetricFamily(
            "llmserve_replica_healthy",
            "1 while a replica of a model is in rotation (health checks and failures decide).",
            labels=["model", "replica"],
        )
        replica_running = GaugeMetricFamily(
            "llmserve_replica_requests_in_flight",
            "Requests running on a replica of a model.",
            labels=["model", "replica"],
        )
        now = self._read()
        load = GaugeMetricFamily(
            "llmserve_replica_load",
            "The load routing balances on: the engine's own running + waiting requests (every "
            "gateway's) where it reports them, plus this gateway's since; else this gateway's.",
            labels=["model", "replica"],
        )
        engine_requests = GaugeMetricFamily(
            "llmserve_replica_engine_requests",
            "Running + waiting requests the replica's engine last reported (vllm:*).",
            labels=["model", "replica"],
        )
        kv_usage = GaugeMetricFamily(
            "llmserve_replica_kv_cache_usage_ratio",
            "KV-cache use the replica's engine last reported (vllm:kv_cache_usage_perc).",
            labels=["model", "replica"],
        )
        for model in now.models:
            name = model.name
            for replica in model.replicas:
                replica_up.add_metric([name, replica.label], 1.0 if replica.healthy else 0.0)
                replica_running.add_metric([name, replica.label], replica.outstanding)
                load.add_metric([name, replica.label], replica.load)
                if replica.engine_requests is not None:
                    engine_requests.add_metric([name, replica.label], replica.engine_requests)
                if replica.kv_cache_usage is not None:
                    kv_usage.add_metric([name, replica.label], replica.kv_cache_usage)
            waiting.add_metric([name], model.waiting)
            tokens.add_metric([name], model.waiting_tokens)
            running.add_metric([name], model.in_flight)
            capacity.add_metric([name], model.max_waiting_requests)
            capacity_tokens.add_metric([name], model.max_waiting_tokens)
            max_in_flight.add_metric([name], model.max_in_flight)
            healthy.add_metric([name], 1.0 if model.healthy else 0.0)
        draining.add_metric([], 1.0 if now.draining else 0.0)
        return [
            replica_up,
            replica_running,
            load,
            engine_requests,
            kv_usage,
            waiting,
            tokens,
            running,
            capacity,
            capacity_tokens,
            max_in_flight,
            draining,
            healthy,
        ]
