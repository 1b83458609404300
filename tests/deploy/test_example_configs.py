"""Every configuration we ship starts and answers a request, as its comments say it will.

Each file in ``examples/`` and ``deploy/config/`` is served by a real ``llmserve serve``
process. Only what cannot exist on a test machine is swapped, and nothing else: the upstream
engines' host names become a fake OpenAI server on loopback, the Redis host a real loopback
``redis-server``, the keys file one this test writes. ``deploy/config/gpu.yaml`` needs a CUDA GPU
and a 7B model download: it is started on the GPU host (benchmarks/gpu), here only loaded.

Each start also shows what a newcomer sees: the port answers /health while the engines load,
and the start ends with one line that says where it listens, what it serves and whether keys
are on.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llmserve.config import load_settings
from tests.support.fake_upstream import FakeUpstream
from tests.support.gateway import ServerProcess, gateway_process
from tests.support.redis_server import RedisServer, redis_server

__all__ = ["redis_server"]

ROOT = Path(__file__).resolve().parents[2]
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def create_key(keys_file: Path) -> str:
    """``llmserve keys create``, as the example's comment says: the key is printed once."""
    command = [sys.executable, "-m", "llmserve", "keys", "--keys-file", str(keys_file)]
    done = subprocess.run(
        [*command, "create", "--name", "example"],
        capture_output=True,
        text=True,
        check=True,
    )
    return next(w for w in done.stdout.split() if w.startswith("sk-"))


def with_upstream(config: dict[str, Any], url: str) -> dict[str, Any]:
    """The file with each upstream engine's host replaced by ``url`` (nothing else changed)."""
    for model in config["models"]:
        if model.get("engine") == "openai":
            model["url"] = url
    return config


def ready_line(gateway: ServerProcess) -> str:
    lines = [line for line in gateway.log_text().splitlines() if "llmserve ready on" in line]
    assert len(lines) == 1, gateway.log_text(3000)
    return lines[0]


async def chat(gateway: ServerProcess, model: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
        body = {"model": model, **CHAT}
        return await client.post("/v1/chat/completions", json=body, headers=headers)


async def test_examples_simulated_answers_without_a_key(tmp_path: Path) -> None:
    """The example says: try the API with curl, no key. So it must answer that curl."""
    config = tmp_path / "simulated.yaml"
    config.write_text((ROOT / "examples" / "simulated.yaml").read_text())
    async with gateway_process(config) as gateway:
        answer = await chat(gateway, "sim-fast")
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
        line = ready_line(gateway)
    assert f"llmserve ready on {gateway.url}, serving sim-fast, sim-slow; API keys OFF" in line


async def test_examples_upstream_answers_with_the_key_its_comment_creates(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    key = create_key(keys)
    config = yaml.safe_load((ROOT / "examples" / "upstream.yaml").read_text())
    async with FakeUpstream() as upstream:
        text = yaml.safe_dump(with_upstream(config, upstream.url))
        env = {"LLMSERVE_AUTH__KEYS_FILE": str(keys)}
        async with gateway_process(tmp_path / "upstream.yaml", text, env=env) as gateway:
            assert (await chat(gateway, "smollm2")).status_code == 401
            answer = await chat(gateway, "smollm2", key)
            assert answer.status_code == 200, answer.text
            line = ready_line(gateway)
        assert upstream.bodies[-1]["model"] == "smollm2-135m-instruct"  # its upstream_model
    assert f"serving smollm2; API keys on (1 in {keys})" in line


async def test_deploy_gateway_config_serves_both_models_with_limits_in_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    keys = tmp_path / "keys.yaml"
    key = create_key(keys)
    config = yaml.safe_load((ROOT / "deploy" / "config" / "gateway.yaml").read_text())
    env = {
        "LLMSERVE_AUTH__KEYS_FILE": str(keys),
        "LLMSERVE_RATE_LIMITS__REDIS_URL": redis_server.url,
    }
    async with FakeUpstream() as upstream:
        text = yaml.safe_dump(with_upstream(config, upstream.url))
        async with gateway_process(tmp_path / "gateway.yaml", text, env=env) as gateway:
            for model in ("qwen2.5-14b-instruct", "qwen2.5-coder-7b-instruct"):
                answer = await chat(gateway, model, key)
                assert answer.status_code == 200, answer.text
            assert '"message": "llmserve ready on' in gateway.log_text()  # JSON logs
    # The store is the real Redis: the key's limits state went there (none set: no buckets),
    # and the server reached it at start without failing closed.
    assert redis_server.client().ping()


@pytest.mark.timeout(600)
async def test_deploy_cpu_config_serves_chat_and_embeddings_in_process(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The CPU image's configuration: both embedded models in process (real vLLM). The port
    answers /health within seconds, long before the engines are ready."""
    keys = tmp_path / "keys.yaml"
    key = create_key(keys)
    env = {
        "LLMSERVE_AUTH__KEYS_FILE": str(keys),
        "LLMSERVE_RATE_LIMITS__REDIS_URL": redis_server.url,
    }
    config = tmp_path / "cpu.yaml"
    config.write_text((ROOT / "deploy" / "config" / "cpu.yaml").read_text())
    gateway = gateway_process(config, env=env)
    started = time.monotonic()
    try:
        await gateway.start(ready="/health", within_s=30)
        bound_after_s = time.monotonic() - started
        assert bound_after_s < 10, f"the port bound after {bound_after_s:.1f} s"
        await gateway.wait_ready("/ready", within_s=400)
        answer = await chat(gateway, "smollm2-135m-instruct", key)
        assert answer.status_code == 200, answer.text
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            body = {"model": "all-minilm-l6-v2", "input": ["a gateway", "a router"]}
            headers = {"Authorization": f"Bearer {key}"}
            vectors = await client.post("/v1/embeddings", json=body, headers=headers)
        assert vectors.status_code == 200, vectors.text
        assert [len(d["embedding"]) for d in vectors.json()["data"]] == [384, 384]
    finally:
        await gateway.stop(within_s=60)


def test_deploy_gpu_config_loads() -> None:
    """Started on the GPU host only (CUDA and a 7B model); here: every key is a setting."""
    settings = load_settings(ROOT / "deploy" / "config" / "gpu.yaml")
    assert settings.models[0].name == "qwen2.5-7b-instruct"
