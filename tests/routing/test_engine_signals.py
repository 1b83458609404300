"""Balancing on what the engines say of their own load (``routing.signals_interval_s``): each
replica's /metrics is read, so a replica busy with other gateways' requests gets fewer of this
gateway's; one that stops reporting is balanced on this gateway's own counts again.

The replicas are fake OpenAI servers whose /metrics say what the test sets (vLLM's names)."""

from __future__ import annotations

from contextlib import AsyncExitStack

from tests.observability.helpers import scrape
from tests.routing.helpers import gateway, upstream_model
from tests.support.client import call
from tests.support.eventually import eventually
from tests.support.fake_upstream import FakeUpstream


def vllm_metrics(running: int, waiting: int = 0, kv: float = 0.5) -> str:
    return (
        f'vllm:num_requests_running{{model_name="m"}} {running}\n'
        f'vllm:num_requests_waiting{{model_name="m"}} {waiting}\n'
        f'vllm:kv_cache_usage_perc{{model_name="m"}} {kv}\n'
    )


async def test_a_replica_busy_with_other_gateways_gets_none_until_it_stops_reporting() -> None:
    async with AsyncExitStack() as stack:
        busy, idle = [await stack.enter_async_context(FakeUpstream()) for _ in range(2)]
        busy.metrics, idle.metrics = vllm_metrics(6, 4, kv=0.9), vllm_metrics(0)
        model = upstream_model(
            "rt-signals", [busy.url, idle.url], routing={"signals_interval_s": 0.05}
        )
        gw = await stack.enter_async_context(gateway(model))
        await eventually(lambda: busy.metrics_reads > 1 and idle.metrics_reads > 1, 5.0)

        for _ in range(6):  # one at a time: this gateway's own counts are 0 / 0 at each pick
            assert (await call(gw.url, "rt-signals", max_tokens=3)).ok
        assert (busy.received, idle.received) == (0, 6)
        metrics = await scrape(gw.url)
        engine = metrics.value("llmserve_replica_engine_requests", replica=busy.url)
        kv = metrics.value("llmserve_replica_kv_cache_usage_ratio", replica=busy.url)
        assert (engine, kv) == (10, 0.9)

        busy.metrics = None  # it stops reporting: balanced on this gateway's counts again
        reads = busy.metrics_reads
        await eventually(lambda: busy.metrics_reads > reads + 1, 5.0)
        for _ in range(6):
            assert (await call(gw.url, "rt-signals", max_tokens=3)).ok
        assert busy.received == 3 and idle.received == 9
