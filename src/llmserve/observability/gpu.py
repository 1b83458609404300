"""GPU gauges from NVML (``nvidia-ml-py``), read at scrape time: memory used/total and
utilisation per GPU. Absent (not zero, not an error) where there is no GPU or no NVML.

Depends on prometheus-client and pynvml only, so it can be checked on a GPU host by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


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
                memory = _memory(nvml, handle)
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


def _memory(nvml: Any, handle: Any) -> Any:
    """Memory info as nvidia-smi reports it: v2's ``used`` leaves out driver-reserved memory,
    which v1 counts (≈480 MiB more on an H100). Older drivers only have v1."""
    version = getattr(nvml, "nvmlMemory_v2", None)
    if version is not None:
        try:
            return nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
        except Exception:
            pass
    return nvml.nvmlDeviceGetMemoryInfo(handle)
