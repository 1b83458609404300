"""The fleet benchmark: N simulated vLLM replicas (separate processes on loopback), a router in
front, a workload replayed through the router's OpenAI API with streaming. Every router x
workload x N gets fresh replicas and a fresh router, so each starts with cold caches.

Per request: TTFT, output tokens, the replica that served it; per run: each replica's prefix-cache
hit rate (hits / queries, from its /metrics) and share of the requests. Writes
``<out>/<name>.{md,json,png}``.

    .venv/bin/python -m benchmarks.fleet.run                       # the full run
    .venv/bin/python -m benchmarks.fleet.run --replicas 4 --users 20 --workloads multi_turn \\
        --routers sglang:round_robin llmserve:prefix sglang:cache_aware --name fleet-short

Routers are named as in routers.py (``llmserve:<policy>``, ``sglang:<policy>``,
``vllm-router:<policy>``); ``--sim capacity_blocks=2048`` sets the replicas' model.
``--time-scale 2`` runs every timing (the model's and the workload's) twice as slow: the same
results on a host too slow for the token rate.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from benchmarks.fleet import client, report, routers
from benchmarks.fleet.engine import SimConfig
from benchmarks.fleet.sim_metrics import parse
from benchmarks.fleet.workload import WORKLOADS, Spec, Workload
from benchmarks.servers import stop_all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sim_config(pairs: list[str], time_scale: float) -> SimConfig:
    values: dict[str, float] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        values[key] = float(value)
    base = SimConfig()
    fields = {}
    for f in dataclasses.fields(SimConfig):
        value = values.pop(f.name, getattr(base, f.name))
        scale = time_scale if f.name.endswith("_ms") or "_ms_" in f.name else 1.0
        fields[f.name] = type(getattr(base, f.name))(value * scale)
    if values:
        raise SystemExit(f"unknown --sim settings: {sorted(values)}")
    return SimConfig(**fields)


def start_replicas(
    config: SimConfig, count: int, tmp: Path
) -> tuple[list[str], list[subprocess.Popen[bytes]]]:
    urls, procs = [], []
    for _ in range(count):
        port = free_port()
        argv = [sys.executable, "-m", "benchmarks.fleet.sim_replica", "--port", str(port)]
        for f in dataclasses.fields(SimConfig):
            argv += ["--" + f.name.replace("_", "-"), str(getattr(config, f.name))]
        log = (tmp / f"replica-{port}.log").open("wb")
        procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        urls.append(f"http://127.0.0.1:{port}")
    return urls, procs


async def _ready(session: aiohttp.ClientSession, url: str, chat: bool) -> bool:
    try:
        if not chat:
            async with session.get(url + "/health") as r:
                return r.status == 200
        probe = {
            "model": routers.MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 1,
        }
        async with session.post(url + "/v1/chat/completions", json=probe) as r:
            await r.read()
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def wait_ready(
    url: str, chat: bool, proc: subprocess.Popen[bytes], limit_s: float = 90
) -> None:
    """Until ``url`` answers (/health, or a chat request when ``chat``), or its process exits."""
    deadline = time.monotonic() + limit_s
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            if await _ready(session, url, chat):
                return
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} did not become ready in {limit_s:.0f} s")


async def scrape(
    urls: list[str], procs: list[subprocess.Popen[bytes]] | None = None
) -> list[dict[str, float]]:
    """Every replica's /metrics; a replica that does not answer is an error naming it."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def one(index: int, url: str) -> dict[str, float]:
            try:
                async with session.get(url + "/metrics") as r:
                    return parse(await r.text())
            except (aiohttp.ClientError, TimeoutError) as exc:
                code = procs[index].poll() if procs else None
                state = "running" if code is None else f"exited with {code}"
                raise RuntimeError(f"replica {url} ({state}): /metrics: {exc!r}") from exc

        return list(await asyncio.gather(*(one(i, url) for i, url in enumerate(urls))))


async def run_one(
    name: str, workload: Workload, config: SimConfig, count: int, time_scale: float, tmp: Path
) -> report.Row:
    urls, procs = start_replicas(config, count, tmp)
    try:
        for url, proc in zip(urls, procs, strict=True):
            await wait_ready(url, False, proc)
        port = free_port()
        router = routers.launcher(name)(urls, port, tmp)
        procs.append(router)
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url, True, router)
        before = await scrape(urls, procs)
        samples, seconds = await client.replay(url, routers.MODEL, workload, time_scale)
        after = await scrape(urls, procs)
    finally:
        await asyncio.to_thread(stop_all, procs, 10)
    replica_ids = [u.rsplit(":", 1)[1] for u in urls]
    return report.row(name, workload.name, samples, seconds, replica_ids, before, after)


def _log_tails(tmp: Path) -> dict[str, str]:
    return {p.name: p.read_text(errors="replace")[-2000:] for p in sorted(tmp.glob("*.log"))}


async def run_twice(
    name: str, workload: Workload, config: SimConfig, count: int, time_scale: float
) -> report.Row:
    """One router x workload x N; a run that fails is tried once more, on fresh processes,
    before it is reported with why and the tails of its processes' logs."""
    error, logs = "", {}
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory(prefix="fleet-") as tmp:
            try:
                return await run_one(name, workload, config, count, time_scale, Path(tmp))
            except (RuntimeError, TimeoutError, OSError) as exc:
                error = str(exc)
                logs = await asyncio.to_thread(_log_tails, Path(tmp))
        if attempt == 1:
            print(f"{name} {workload.name} N={count}: {error}; once more", flush=True)
    return report.failed(name, workload.name, count, error, logs)


async def run_all(args: argparse.Namespace) -> list[report.Row]:
    given = {"users": args.users, "seed": args.seed}
    spec = Spec(**{k: v for k, v in given.items() if v is not None})
    workloads = [WORKLOADS[w](spec) for w in args.workloads]
    config = sim_config(args.sim, args.time_scale)
    rows = []
    for count in args.replicas:
        for workload in workloads:
            for name in args.routers:
                row = await run_twice(name, workload, config, count, args.time_scale)
                print(report.line(row), flush=True)
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--routers", nargs="+", default=list(routers.DEFAULT_ROUTERS))
    parser.add_argument(
        "--workloads", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS)
    )
    parser.add_argument("--users", type=int, help="users (multi_turn); default Spec's")
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--sim", nargs="*", default=[], metavar="KEY=VALUE", help="SimConfig fields"
    )
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=report.RESULTS)
    parser.add_argument("--name", default="fleet")
    args = parser.parse_args()
    rows = asyncio.run(run_all(args))
    report.write(rows, args, args.out, args.name)


if __name__ == "__main__":
    main()
