"""Gauges read at scrape time: the gateway's queues, and the GPUs through NVML.

Read at scrape rather than kept up to date on every event, so the request path pays nothing.
GPU metrics are absent (not zero, not an error) where there is no GPU or no NVML.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmserve.engines.registry import ModelRegistry

log = logging.getLogger(__name__)


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
        draining = GaugeMetricFamily("llmserve_draining", "1 while the server drains.")
        for name in self._models.names:
            admission = self._models.admission(name)
            waiting.add_metric([name], admission.queued)
            tokens.add_metric([name], admission.state.waiting_tokens)
            running.add_metric([name], admission.in_flight)
            capacity.add_metric([name], admission.state.limits.max_waiting_requests)
        draining.add_metric([], 1.0 if self._models.draining else 0.0)
        return [waiting, tokens, running, capacity, draining]


class GpuCollector(Collector):
    """Memory used/total and utilisation per GPU, from NVML (``nvidia-ml-py``)."""

    def __init__(self, nvml: Any = None) -> None:
        self._nvml = nvml if nvml is not None else _load_nvml()

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._nvml is None:
            return
        nvml = self._nvml
        used = GaugeMetricFamily(
            "llmserve_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu", "name"]
        )
        total = GaugeMetricFamily(
            "llmserve_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu", "name"]
        )
        util = GaugeMetricFamily(
            "llmserve_gpu_utilization_ratio",
            "Share of time the GPU was busy (0-1).",
            labels=["gpu", "name"],
        )
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = nvml.nvmlDeviceGetName(handle)
                labels = [str(index), name.decode() if isinstance(name, bytes) else str(name)]
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric(labels, float(memory.used))
                total.add_metric(labels, float(memory.total))
                util.add_metric(labels, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        except Exception as exc:  # a GPU fell off the bus: report nothing rather than fail
            log.warning("NVML query failed: %s", exc)
            return
        yield from (used, total, util)


def _load_nvml() -> Any:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU: the metrics are simply absent
        return None
    return pynvml
