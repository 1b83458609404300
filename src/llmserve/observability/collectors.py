"""Queue gauges, read at scrape time from the live admission state, so the request path pays
nothing to keep them up to date."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmserve.engines.registry import ModelRegistry


class QueueCollector(Collector):
    def __init__(self, models: ModelRegistry) -> None:
        self._models = models

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
        for name in self._models.names:
            for replica in self._models.replicas(name) or ():
                replica_up.add_metric([name, replica.label], 1.0 if replica.healthy else 0.0)
                replica_running.add_metric([name, replica.label], replica.outstanding)
            admission = self._models.admission(name)
            waiting.add_metric([name], admission.queued)
            tokens.add_metric([name], admission.state.waiting_tokens)
            running.add_metric([name], admission.in_flight)
            capacity.add_metric([name], admission.state.limits.max_waiting_requests)
            capacity_tokens.add_metric([name], admission.state.limits.max_waiting_tokens)
            max_in_flight.add_metric([name], admission.state.limits.max_in_flight)
            healthy.add_metric([name], 1.0 if self._models.healthy.get(name) else 0.0)
        draining.add_metric([], 1.0 if self._models.draining else 0.0)
        return [
            replica_up,
            replica_running,
            waiting,
            tokens,
            running,
            capacity,
            capacity_tokens,
            max_in_flight,
            draining,
            healthy,
        ]
