"""Managed engines: llmserve starts a model's replicas as child processes, health-checks them,
restarts one that dies (with backoff), and stops them all when it stops. One model's crash
never takes down the gateway or the other models.

The children are llmserve itself with the simulated engine (``python -m llmserve serve``), so
no vLLM is needed. A managed replica exposes nothing over HTTP, so its process is found with
psutil: a child of this test process whose command line holds the child's config path.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from llmserve.config import HealthConfig, ManagedModel, SimulatedModel
from tests.routing.helpers import (
    Deltas,
    assert_full,
    call_many,
    gateway,
    get_json,
    scrape,
    wait_ready,
)
from tests.support.client import call
from tests.support.eventually import eventually
from tests.support.gateway import gateway_process

# A child llmserve takes 1-2 s to answer on an idle 2-core machine, several times that on a
# busy one: the bounds below are generous, the tests return as soon as what they wait for holds.
START_WITHIN_S = 60.0


def child_config(tmp_path: Path, name: str) -> Path:
    """The YAML config of a child llmserve serving ``name`` with the simulated engine (keys off:
    the gateway calls it without one)."""
    path = tmp_path / f"{name}-child.yaml"
    config = {
        "log_level": "warning",
        "auth": {"enabled": False},
        "models": [
            {
                "engine": "simulated",
                "name": name,
                "tokens_per_second": 200,
                "first_token_latency_s": 0.01,
            }
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def llmserve_command(config: Path) -> tuple[str, ...]:
    return (sys.executable, "-m", "llmserve", "serve", "--config", str(config), "--port", "{port}")


def children_running(marker: str) -> dict[int, psutil.Process]:
    """Live descendants of this process whose command line contains ``marker``."""
    found: dict[int, psutil.Process] = {}
    for process in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if any(marker in part for part in process.cmdline()):
                found[process.pid] = process
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def wait_for(condition: Any, within_s: float, what: str) -> float:
    # Every 0.1 s: a walk of the process tree is not free on a busy machine.
    return await eventually(condition, within_s, what, interval=0.1)


async def test_managed_replicas_serve_survive_a_kill_and_stop_with_the_gateway(
    tmp_path: Path,
) -> None:
    name, other = "rt-managed", "rt-managed-neighbour"
    config = child_config(tmp_path, name)
    managed = ManagedModel(
        engine="managed",
        name=name,
        replicas=2,
        command=llmserve_command(config),
        startup_timeout_s=START_WITHIN_S,
        restart_backoff_s=0.5,
        restart_backoff_max_s=2.0,
        health=HealthConfig(interval_s=0.5, probe_interval_s=0.2, timeout_s=2.0),
    )
    neighbour = SimulatedModel(engine="simulated", name=other, tokens_per_second=200)
    async with gateway(managed, neighbour, ready=False, cache_dir=tmp_path) as gw:
        await wait_ready(gw.url, within_s=START_WITHIN_S)  # one healthy replica is enough
        await wait_for(
            lambda: _ready_replicas(gw.url, name, 2), START_WITHIN_S, "both children to answer"
        )
        first = children_running(str(config))
        assert len(first) == 2, f"expected two child engines, found {first}"
        for s in await call_many(4, lambda _: call(gw.url, name, max_tokens=4)):
            assert_full(s, 4, model=name)

        metrics = await Deltas.start(gw.url)
        victim, survivor = sorted(first)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        # While the victim is down and restarting, every request still succeeds.
        outcomes = []
        while time.monotonic() - killed_at < 2.0:
            outcomes += await call_many(3, lambda _: call(gw.url, name, max_tokens=3))
            outcomes.append(await call(gw.url, other, max_tokens=3))
        for s in outcomes:
            assert_full(s, 3)

        async def restarted() -> bool:
            await metrics.after()
            return metrics("llmserve_engine_restarts_total", model=name) >= 1

        await wait_for(restarted, START_WITHIN_S, "llmserve_engine_restarts_total to count")
        await wait_for(
            lambda: (
                len(children_running(str(config))) == 2
                and victim not in children_running(str(config))
            ),
            START_WITHIN_S,
            "a new child engine in place of the killed one",
        )
        now = children_running(str(config))
        assert survivor in now, "the surviving child was restarted too"
        [replacement] = set(now) - {survivor}
        assert not alive(victim)
        await wait_for(
            lambda: _ready_replicas(gw.url, name, 2),
            START_WITHIN_S,
            "both replicas healthy again",
        )
        assert metrics("llmserve_engine_restarts_total", model=name) == 1
        for s in await call_many(6, lambda _: call(gw.url, name, max_tokens=4)):
            assert_full(s, 4, model=name)
        assert_full(await call(gw.url, other, max_tokens=4), 4, model=other)
        status, _, _ = await get_json(gw.url, "/health")
        assert status == 200

    # The gateway stopped: so did its children.
    await wait_for(
        lambda: not alive(survivor) and not alive(replacement),
        10.0,
        "child engines to stop with the gateway",
    )
    assert children_running(str(config)) == {}


async def _ready_replicas(url: str, name: str, healthy: int) -> bool:
    status, body, _ = await get_json(url, "/ready")
    return status == 200 and body["replicas"][name]["healthy"] == healthy


async def test_crash_looping_model_never_takes_down_the_gateway(tmp_path: Path) -> None:
    """A managed engine that exits at once, forever, in a real gateway process: the gateway
    stays up past the engine's startup timeout, serves its other model, says which model is
    not ready, and restarts the engine with backoff instead of in a tight loop."""
    crash, other = "rt-managed-crash", "rt-managed-crash-neighbour"
    marker = "rt-managed-crash-marker"
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "log_level": "warning",
                "auth": {"enabled": False},
                "cache_dir": str(tmp_path),
                "models": [
                    {
                        "engine": "managed",
                        "name": crash,
                        "replicas": 1,
                        "command": [sys.executable, "-c", f"import sys; sys.exit(3)  # {marker}"],
                        "startup_timeout_s": 2.0,
                        "restart_backoff_s": 0.2,
                        "restart_backoff_max_s": 1.0,
                    },
                    {"engine": "simulated", "name": other, "tokens_per_second": 200},
                ],
            }
        )
    )
    process = gateway_process(config)
    url = process.url

    async def other_serves() -> bool:
        try:
            seen = await call(url, other, max_tokens=3, timeout_s=5)
        except httpx.TransportError:
            return False
        return seen.ok

    try:
        await process.start(ready=other_serves, within_s=START_WITHIN_S)
        served_at = time.monotonic()
        first = await scrape(url)
        await asyncio.sleep(3.0)  # past the crashing engine's startup timeout (2 s)
        assert process.returncode is None, "the gateway died with its crashing engine"
        last = await scrape(url)

        restarts = last.value("llmserve_engine_restarts_total", model=crash) - first.value(
            "llmserve_engine_restarts_total", model=crash
        )
        window = time.monotonic() - served_at
        # With 0.2 s doubling to at most 1 s, about 3-5 restarts fit in 3 s; without backoff a
        # process that exits at once restarts dozens of times.
        assert 1 <= restarts <= 2 + window / 0.2 / 2, f"{restarts} restarts in {window:.1f} s"

        status, body, _ = await get_json(url, "/ready")
        assert status == 503, body
        assert body["models"] == {crash: False, other: True}, body
        refused = await call(url, crash, max_tokens=3)
        assert refused.status == 503, refused
        assert await other_serves()
        status, _, _ = await get_json(url, "/health")
        assert status == 200
    finally:
        await process.stop(15.0)
        stderr = process.log_text()
        assert "Traceback" not in stderr, stderr[-3000:]
    assert children_running(marker) == {}


async def test_child_that_never_answers_is_killed_and_started_again(tmp_path: Path) -> None:
    """A child that runs but never answers its health check within startup_timeout_s is
    stopped and replaced; the gateway's other model serves throughout."""
    name, other = "rt-managed-wedged", "rt-managed-wedged-neighbour"
    marker = "rt-managed-wedged-marker"
    managed = ManagedModel(
        engine="managed",
        name=name,
        replicas=1,
        command=(sys.executable, "-c", f"import time; time.sleep(600)  # {marker}"),
        startup_timeout_s=1.0,
        restart_backoff_s=0.2,
        restart_backoff_max_s=0.5,
    )
    neighbour = SimulatedModel(engine="simulated", name=other, tokens_per_second=200)
    async with gateway(managed, neighbour, ready=False, cache_dir=tmp_path) as gw:
        metrics = await Deltas.start(gw.url)
        await wait_for(lambda: len(children_running(marker)) == 1, 10.0, "the child to start")
        [first] = children_running(marker)
        assert_full(await call(gw.url, other, max_tokens=3), 3, model=other)

        async def replaced() -> bool:
            await metrics.after()
            running = children_running(marker)
            restarted = metrics("llmserve_engine_restarts_total", model=name) >= 1
            return restarted and len(running) == 1 and first not in running

        await wait_for(replaced, 10.0, "the wedged child to be replaced")
        assert not alive(first)
        status, body, _ = await get_json(gw.url, "/ready")
        assert status == 503 and body["models"] == {name: False, other: True}, body
        assert_full(await call(gw.url, other, max_tokens=3), 3, model=other)
    await wait_for(lambda: not children_running(marker), 10.0, "children to stop with the gateway")
