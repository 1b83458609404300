"""The replica's ``/metrics``: the engine's state read at scrape time, under vLLM's metric names
and ``model_name`` label, so a router or scraper written for ``vllm serve`` reads it unchanged."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.fleet.engine import SimEngine


class EngineCollector:
    def __init__(self, engine: SimEngine, model: str) -> None:
        self._engine = engine
        self._model = model

    def collect(self) -> Iterable[Metric]:
        engine, counters = self._engine, self._engine.counters
        yield self._gauge("num_requests_running", "Requests in the batch.", engine.running)
        yield self._gauge("num_requests_waiting", "Requests queued.", len(engine.waiting))
        usage = engine.cache.used / engine.cache.capacity
        yield self._gauge("kv_cache_usage_perc", "KV blocks in use (1 = all).", usage)
        yield self._counter(
            "prefix_cache_queries", "Prompt tokens looked up.", counters.prefix_queries
        )
        yield self._counter(
            "prefix_cache_hits", "Prompt tokens found cached.", counters.prefix_hits
        )
        yield self._counter("prompt_tokens", "Prompt tokens admitted.", counters.prompt_tokens)
        yield self._counter("generation_tokens", "Tokens generated.", counters.generation_tokens)
        success = CounterMetricFamily(
            "vllm:request_success", "Finished requests.", labels=["model_name", "finished_reason"]
        )
        success.add_metric([self._model, "length"], counters.finished)
        yield success

    def _gauge(self, name: str, doc: str, value: float) -> Metric:
        family = GaugeMetricFamily(f"vllm:{name}", doc, labels=["model_name"])
        family.add_metric([self._model], value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> Metric:
        family = CounterMetricFamily(f"vllm:{name}", doc, labels=["model_name"])
        family.add_metric([self._model], value)
        return family


def registry_for(engine: SimEngine, model: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, model))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def parse(text: str) -> dict[str, float]:
    """Sample name -> value, the values of one name (over its labels) added: what the benchmark
    reads back from a replica's /metrics, the sim's or vLLM's."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values
