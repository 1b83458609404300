"""Prometheus metrics over a real server: token counters, latency histograms, request outcomes,
rejections by reason, scrape-time queue gauges, and what labels never carry. Plus the NVML GPU
collector against a fake NVML.

Counters and histograms are process-global, so every check is a delta on names (models, keys)
that only its test uses."""

from __future__ import annotations

import asyncio
import json
import sys
import types
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

import llmserve.app
from llmserve.config import Limits
from llmserve.observability import gpu
from llmserve.observability.gpu import GpuCollector
from tests.conftest import serve
from tests.observability.helpers import (
    PROMPT,
    Deltas,
    Scrape,
    add_key,
    bearer,
    chat,
    completion,
    read_stream,
    scrape,
    settings,
    sim_model,
)
from tests.support.errors import assert_openai_error
from tests.support.eventually import eventually

REQUESTS = "llmserve_requests_total"
REJECTIONS = "llmserve_rejections_total"


async def test_completed_requests_count_tokens_and_latencies() -> None:
    whole, streamed = "obs-m-whole", "obs-m-stream"
    async with (
        serve(settings(sim_model(whole), sim_model(streamed))) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        d = await Deltas.start(server.url)
        usages: dict[str, list[dict[str, int]]] = {whole: [], streamed: []}

        for path, body in (
            ("/v1/chat/completions", chat(whole, 5)),
            ("/v1/completions", completion(whole, 7)),
        ):
            response = await client.post(path, json=body)
            assert response.status_code == 200, response.text
            usages[whole].append(response.json()["usage"])

        deltas = []
        for path, body in (
            ("/v1/chat/completions", chat(streamed, 6, stream=True)),
            ("/v1/completions", completion(streamed, 4, stream=True)),
            ("/generate", {"model": streamed, "prompt": PROMPT, "max_tokens": 3}),
        ):
            result = await read_stream(client, path, body)
            assert result.status == 200 and not result.errors
            assert result.usage is not None
            usages[streamed].append(result.usage)
            deltas.append(result.deltas)
        assert [u["completion_tokens"] for u in usages[streamed]] == deltas == [6, 4, 3]

        # A stream is recorded when it closes, which may be just after its last byte.
        await d.until(REQUESTS, 3, model=streamed, status="ok")
        for model, usage in usages.items():
            n = len(usage)
            assert d(REQUESTS, model=model, status="ok") == n
            assert d(REQUESTS, model=model) == n  # no other outcome
            assert d(REQUESTS, model=model, key="anonymous") == n
            prompt = sum(u["prompt_tokens"] for u in usage)
            generated = sum(u["completion_tokens"] for u in usage)
            assert prompt > 0 and generated > 0
            assert d("llmserve_prompt_tokens_total", model=model, key="anonymous") == prompt
            assert d("llmserve_generation_tokens_total", model=model, key="anonymous") == generated
            for histogram in (
                "llmserve_time_to_first_token_seconds",
                "llmserve_request_duration_seconds",
                "llmserve_queue_wait_seconds",
            ):
                assert d(f"{histogram}_count", model=model) == n, histogram
                # Every observation falls in the +Inf bucket.
                assert d(f"{histogram}_bucket", model=model, le="+Inf") == n, histogram
            # The engine's first token comes after its 10 ms first-token latency.
            assert d("llmserve_time_to_first_token_seconds_sum", model=model) >= 0.01 * n
            assert d("llmserve_request_duration_seconds_sum", model=model) > 0

        # One inter-token gap per token after the first, of each stream.
        itl = d("llmserve_inter_token_latency_seconds_count", model=streamed)
        assert itl == sum(u["completion_tokens"] - 1 for u in usages[streamed]) == 10


async def _open_then_drop(url: str, path: str, body: bytes) -> None:
    """Send a streaming request on a raw socket, wait for its first token, then hang up."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body)
    await writer.drain()
    received = b""
    while b"data:" not in received:
        chunk = await asyncio.wait_for(reader.read(4096), timeout=5)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()


async def test_disconnected_requests_count_as_disconnect() -> None:
    model = "obs-m-disconnect"
    async with serve(settings(sim_model(model, tokens_per_second=20))) as server:
        d = await Deltas.start(server.url)
        body = chat(model, 200, stream=True)
        await _open_then_drop(server.url, "/v1/chat/completions", json.dumps(body).encode())
        # A whole (non-streaming) request whose client gives up while it generates.
        async with httpx.AsyncClient(base_url=server.url, timeout=0.3) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", json=completion(model, 200))
        await d.until(REQUESTS, 2, model=model, status="disconnect")
        assert d(REQUESTS, model=model, status="ok") == 0
        assert d("llmserve_request_duration_seconds_count", model=model) == 2
        # Tokens generated before the disconnect are still counted (and charged).
        assert d("llmserve_generation_tokens_total", model=model) > 0
        scraped = await scrape(server.url)
        assert scraped.value("llmserve_requests_in_flight", model=model) == 0
        assert scraped.value("llmserve_queue_requests", model=model) == 0


async def test_request_timeout_counts_as_timeout() -> None:
    model = "obs-m-timeout"
    limits = Limits(request_timeout_s=0.4)
    async with (
        serve(settings(sim_model(model, tokens_per_second=10), limits=limits)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        d = await Deltas.start(server.url)
        response = await client.post("/v1/completions", json=completion(model, 50))
        assert response.status_code == 504, response.text
        # A stream that started gets its timeout in-band: not a rejection, still a timeout.
        result = await read_stream(client, "/v1/completions", completion(model, 50, stream=True))
        assert result.status == 200
        assert result.errors
        assert_openai_error(result.errors[0], code="request_timeout")
        await d.until(REQUESTS, 2, model=model, status="timeout")
        assert d(REQUESTS, model=model) == 2
        assert d(REJECTIONS, reason="timeout", key="anonymous") == 1


async def test_rejections_by_reason_without_keys() -> None:
    full, deadline = "obs-m-full", "obs-m-deadline"
    models = (
        sim_model(full, tokens_per_second=20, max_in_flight=1, max_waiting_requests=0),
        sim_model(deadline, tokens_per_second=20, max_in_flight=1),
    )
    async with (
        serve(settings(*models, limits=Limits(max_body_bytes=4096))) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        d = await Deltas.start(server.url)

        # validation: a body too large (refused before auth: "unauthenticated")...
        r = await client.post("/v1/completions", json=completion(full, 1, prompt="x " * 4096))
        assert r.status_code == 413, r.text
        # ... a body that is not JSON, a field out of range, an unknown model.
        r = await client.post(
            "/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400, r.text
        r = await client.post("/v1/completions", json=completion(full, 10**6))
        assert r.status_code == 400, r.text
        r = await client.post("/v1/completions", json=completion("obs-m-no-such-model", 1))
        assert r.status_code == 404, r.text

        # queue_full and deadline: each model's one slot is taken by a running request.
        holders = [
            asyncio.create_task(client.post("/v1/completions", json=completion(m, 12)))
            for m in (full, deadline)
        ]

        async def both_running() -> bool:
            s = await scrape(server.url)
            return all(
                s.value("llmserve_requests_in_flight", model=m) == 1 for m in (full, deadline)
            )

        await eventually(both_running, within=5.0, what="both slots taken", interval=0.02)
        r = await client.post("/v1/completions", json=completion(full, 1))
        assert_openai_error(r, 503, code="queue_full")
        r = await client.post(
            "/v1/completions", json=completion(deadline, 1), headers={"X-Queue-Timeout": "0.1"}
        )
        assert_openai_error(r, 503, code="queue_timeout")
        assert all(h.status_code == 200 for h in await asyncio.gather(*holders))

        await d.after()
        assert d(REJECTIONS, reason="validation", key="anonymous") == 3
        assert d(REJECTIONS, reason="queue_full", key="anonymous") == 1
        assert d(REJECTIONS, reason="deadline", key="anonymous") == 1
        assert d(REJECTIONS, reason="validation", key="unauthenticated") == 1
        assert d(REJECTIONS) == 6
        # Refused in the queue: they reached the pipeline, and ended that way.
        assert d(REQUESTS, model=full, status="queue_full") == 1
        assert d(REQUESTS, model=deadline, status="deadline") == 1


async def test_rejections_with_keys_and_no_secrets_in_labels(tmp_path: Path) -> None:
    model = "obs-m-keys"
    keys_file = tmp_path / "keys.yaml"
    ok_key = add_key(keys_file, "obs-m-ok")
    limited = add_key(keys_file, "obs-m-rpm", rpm=1)
    narrow = add_key(keys_file, "obs-m-narrow", models=["obs-m-other"])
    prompt = "zanzibar quokka marmalade"
    async with (
        serve(settings(sim_model(model), keys_file=keys_file)) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        d = await Deltas.start(server.url)  # /metrics is public

        r = await client.post("/v1/completions", json=completion(model, 1))
        assert r.status_code == 401
        r = await client.post(
            "/v1/completions", json=completion(model, 1), headers=bearer(ok_key + "x")
        )
        assert r.status_code == 401

        for expected in (200, 429):
            r = await client.post(
                "/v1/completions", json=completion(model, 2, prompt=prompt), headers=bearer(limited)
            )
            assert r.status_code == expected, r.text
        r = await client.post("/v1/chat/completions", json=chat(model, 1), headers=bearer(narrow))
        assert r.status_code == 403, r.text

        ids = []
        for path, body in (
            (
                "/v1/chat/completions",
                chat(model, 3, messages=[{"role": "user", "content": prompt}]),
            ),
            ("/v1/completions", completion(model, 3, prompt=prompt)),
        ):
            r = await client.post(
                path, json=body, headers={**bearer(ok_key), "X-Request-ID": "obs-m-req-id-1"}
            )
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        result = await read_stream(
            client, "/v1/chat/completions", chat(model, 3, stream=True), headers=bearer(ok_key)
        )
        ids.extend(result.ids)
        assert any(i.startswith("chatcmpl-") for i in ids)

        await d.until(REQUESTS, 3, model=model, key="obs-m-ok", status="ok")
        assert d(REJECTIONS, reason="auth", key="unauthenticated") == 2
        assert d(REJECTIONS, reason="rate_limit", key="obs-m-rpm") == 1
        assert d(REJECTIONS, reason="permission", key="obs-m-narrow") == 1
        assert d(REQUESTS, model=model, key="obs-m-rpm", status="ok") == 1
        assert d("llmserve_prompt_tokens_total", model=model, key="obs-m-rpm") == 3

        # No key, prompt or request id anywhere in the exposition, labels included.
        text = d.now.text
        secrets = [ok_key, limited, narrow, ok_key + "x", prompt, "obs-m-req-id-1", *ids]
        for secret in secrets + [s[len("sk-llmserve-") :] for s in (ok_key, limited, narrow)]:
            assert secret not in text, secret
        for word in prompt.split():
            assert word not in text
        labels = d.now.label_values()
        assert not [v for v in labels if v.startswith(("chatcmpl-", "cmpl-", "sk-"))]


async def test_queue_gauges_follow_a_waiting_request() -> None:
    model = "obs-m-gauge"
    async with (
        serve(settings(sim_model(model, tokens_per_second=20, max_in_flight=1))) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        idle = await scrape(server.url)
        assert idle.value("llmserve_queue_requests", model=model) == 0
        assert idle.value("llmserve_queue_tokens", model=model) == 0
        assert idle.value("llmserve_requests_in_flight", model=model) == 0
        assert idle.value("llmserve_queue_capacity_requests", model=model) == 256
        assert idle.value("llmserve_draining") == 0
        assert idle.has("llmserve_draining")

        first = asyncio.create_task(client.post("/v1/completions", json=completion(model, 8)))
        await eventually(lambda: server.models.admission(model).in_flight == 1, within=5.0)
        second = asyncio.create_task(client.post("/v1/completions", json=completion(model, 4)))
        seen: list[Scrape] = []

        async def one_waits() -> bool:
            seen.append(await scrape(server.url))
            return seen[-1].value("llmserve_queue_requests", model=model) == 1

        await eventually(one_waits, within=5.0, what="a queued request", interval=0.02)
        waiting = seen[-1]
        assert waiting.value("llmserve_requests_in_flight", model=model) == 1
        # The waiting request's cost: prompt (3 tokens) + max_tokens * n.
        assert waiting.value("llmserve_queue_tokens", model=model) == 3 + 4
        assert not second.done()

        assert [r.status_code for r in await asyncio.gather(first, second)] == [200, 200]

        async def idle_again() -> bool:
            s = await scrape(server.url)
            return (
                s.value("llmserve_queue_requests", model=model) == 0
                and s.value("llmserve_requests_in_flight", model=model) == 0
            )

        await eventually(idle_again, within=5.0, what="gauges back to 0", interval=0.02)
        final = await scrape(server.url)
        assert final.value("llmserve_queue_tokens", model=model) == 0
        assert final.value("llmserve_draining") == 0
        if not GpuCollector().available:  # this host: no NVML, so no GPU metrics at all
            assert not [n for n in final.names() if n.startswith("llmserve_gpu_")]
            assert "llmserve_gpu_" not in final.text


# --- GpuCollector against a fake NVML -------------------------------------------------------


class NVMLError(Exception):
    pass


class FakeNvml:
    """Two GPUs; ``fail_on`` names a call that raises (for the second GPU, where it takes one)."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        # (name, used bytes, total bytes, utilisation %)
        self.devices: list[tuple[bytes | str, int, int, int]] = [
            (b"NVIDIA H100 80GB HBM3", 10 * 2**30, 80 * 2**30, 37),  # bytes, as old bindings
            ("NVIDIA A10G", 2 * 2**30, 24 * 2**30, 100),
        ]

    def _maybe_fail(self, call: str, index: int = 1) -> None:
        if self.fail_on == call and index == 1:
            raise NVMLError(f"{call}: GPU is lost")

    def nvmlDeviceGetCount(self) -> int:
        self._maybe_fail("count")
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._maybe_fail("handle", index)
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes | str:
        self._maybe_fail("name", handle)
        return self.devices[handle][0]

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: Any = None) -> Any:
        self._maybe_fail("memory", handle)
        _, used, total, _ = self.devices[handle]
        return types.SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        self._maybe_fail("utilization", handle)
        return types.SimpleNamespace(gpu=self.devices[handle][3], memory=0)


class FakeNvmlV2(FakeNvml):
    """Bindings with ``nvmlMemory_v2``: v2's ``used`` leaves out driver-reserved memory. With
    ``v2_works`` false, the driver is too old for v2 and refuses it."""

    RESERVED = 480 * 2**20

    def __init__(self, v2_works: bool = True) -> None:
        super().__init__()
        self.nvmlMemory_v2 = object()
        self.v2_works = v2_works

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: Any = None) -> Any:
        memory = super().nvmlDeviceGetMemoryInfo(handle)
        if version is None:
            return memory
        assert version is self.nvmlMemory_v2
        if not self.v2_works:
            raise NVMLError("Function Not Found")
        return types.SimpleNamespace(
            used=memory.used - self.RESERVED,
            total=memory.total,
            free=memory.free,
            reserved=self.RESERVED,
        )


def _exposition(collector: GpuCollector) -> Scrape:
    registry = CollectorRegistry()
    registry.register(collector)
    return Scrape.parse(generate_latest(registry).decode())


def test_gpu_collector_reports_each_gpu() -> None:
    collector = GpuCollector(FakeNvml())
    assert collector.available
    s = _exposition(collector)
    h100 = {"gpu": "0", "name": "NVIDIA H100 80GB HBM3"}
    a10 = {"gpu": "1", "name": "NVIDIA A10G"}
    assert s.samples[("llmserve_gpu_memory_used_bytes", frozenset(h100.items()))] == 10 * 2**30
    assert s.samples[("llmserve_gpu_memory_total_bytes", frozenset(h100.items()))] == 80 * 2**30
    assert s.samples[("llmserve_gpu_utilization_ratio", frozenset(h100.items()))] == 0.37
    assert s.samples[("llmserve_gpu_memory_used_bytes", frozenset(a10.items()))] == 2 * 2**30
    assert s.samples[("llmserve_gpu_memory_total_bytes", frozenset(a10.items()))] == 24 * 2**30
    assert s.samples[("llmserve_gpu_utilization_ratio", frozenset(a10.items()))] == 1.0
    assert len(s.samples) == 6  # 3 gauges x 2 GPUs, nothing else


def test_gpu_collector_prefers_v2_memory_and_falls_back_to_v1() -> None:
    h100 = {"gpu": "0", "name": "NVIDIA H100 80GB HBM3"}
    used = ("llmserve_gpu_memory_used_bytes", frozenset(h100.items()))
    total = ("llmserve_gpu_memory_total_bytes", frozenset(h100.items()))
    s = _exposition(GpuCollector(FakeNvmlV2()))
    assert s.samples[used] == 10 * 2**30 - FakeNvmlV2.RESERVED
    assert s.samples[total] == 80 * 2**30
    s = _exposition(GpuCollector(FakeNvmlV2(v2_works=False)))
    assert s.samples[used] == 10 * 2**30
    assert len(s.samples) == 6


@pytest.mark.parametrize("fail_on", ["count", "handle", "name", "memory", "utilization"])
def test_gpu_collector_reports_nothing_when_nvml_fails(
    fail_on: str, caplog: pytest.LogCaptureFixture
) -> None:
    collector = GpuCollector(FakeNvml(fail_on=fail_on))
    s = _exposition(collector)  # no exception
    assert not [n for n in s.names() if n.startswith("llmserve_gpu_")]
    assert "GPU is lost" in caplog.text
    # The next scrape, with the GPU back, reports again.
    collector._nvml.fail_on = None
    assert len(_exposition(collector).samples) == 6


def test_gpu_collector_without_nvml_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "_load_nvml", lambda: None)
    collector = GpuCollector(nvml=None)
    assert not collector.available
    assert list(collector.collect()) == []
    assert _exposition(collector).samples == {}


def test_load_nvml_absent_without_bindings_or_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: ImportError
    assert gpu._load_nvml() is None

    def no_driver() -> None:
        raise NVMLError("NVML Shared Library Not Found")

    fake = types.ModuleType("pynvml")
    fake.nvmlInit = no_driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert gpu._load_nvml() is None
    fake.nvmlInit = lambda: None  # type: ignore[attr-defined]
    assert gpu._load_nvml() is fake


async def test_gpu_metrics_on_the_server_with_fake_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llmserve.app, "GpuCollector", lambda: GpuCollector(FakeNvml()))
    async with serve(settings(sim_model("obs-m-gpu"))) as server:
        s = await scrape(server.url)
    assert s.value("llmserve_gpu_memory_total_bytes", gpu="1", name="NVIDIA A10G") == 24 * 2**30
    assert s.value("llmserve_gpu_utilization_ratio", gpu="0") == 0.37
    assert s.has("llmserve_queue_requests", model="obs-m-gpu")


async def test_auth_off_bearer_tokens_share_the_anonymous_label() -> None:
    """With keys off, each bearer token is its own queue tenant, but metrics say "anonymous":
    a label per token would be unbounded (and anyone may send any token)."""
    model = "obs-m-tokens"
    tokens = [f"sk-random-{n}-{n * 7919}" for n in range(4)]
    async with (
        serve(settings(sim_model(model))) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        d = await Deltas.start(server.url)
        for token in tokens:
            r = await client.post(
                "/v1/completions", json=completion(model, 1), headers=bearer(token)
            )
            assert r.status_code == 200, r.text
            r = await client.post(
                "/v1/completions", json=completion(model, 10**6), headers=bearer(token)
            )
            assert r.status_code == 400, r.text
        await d.after()
    assert d(REQUESTS, model=model, key="anonymous", status="ok") == len(tokens)
    assert d(REJECTIONS, reason="validation", key="anonymous") == len(tokens)
    keys = {dict(labels).get("key") for (name, labels) in d.now.samples if name == REQUESTS}
    assert not [k for k in keys if k and k.startswith("token-")], keys
    for token in tokens:
        assert token not in d.now.text
