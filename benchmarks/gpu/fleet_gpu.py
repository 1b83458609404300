"""Issue 19 on real engines: several ``vllm serve`` replicas of one model on one GPU, the fleet
benchmark's multi-turn workload through each router in turn, vLLM's own prefix-cache counters
and the client's TTFT.

Run on the GPU host with the vLLM bundle on the path (benchmarks/gpu/run_on_host.sh fleet ...):

    fleet start                  start --replicas vllm serve processes (a session of their own:
                                 they outlive the call; the next call measures the same ones)
    fleet run ROUTER...          each router over the replicas, in turn, one workload each (a
                                 fresh seed a run, so no run finds another's prompts cached)
    fleet stop

Routers: ``llmserve:<policy>`` (llmserve in upstream mode, ``routing.policy``) and
``sglang:cache_aware`` (sglang-router from the bundle's third part). The model is the dummy
Llama-3-8B shape (``load_format: dummy``): the workload's words are mapped onto its word-level
vocabulary (``w3`` ... ``w128255``), one token each, so prompts that share text share tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.bench import distribution
from benchmarks.fleet.client import replay
from benchmarks.fleet.workload import Spec, Turn, Workload, multi_turn
from benchmarks.gpu.suite import State, alive, launch
from llmserve.routing.engine_signals import parse_signals

MODEL = "m"
FIRST_PORT = 8501
ROUTER_PORT = 8590
VOCAB = 128256


def replica_urls(count: int) -> list[str]:
    return [f"http://127.0.0.1:{FIRST_PORT + i}" for i in range(count)]


def vocab_word(word: str) -> str:
    return f"w{3 + zlib.crc32(word.encode()) % (VOCAB - 3)}"


def on_dummy_vocab(workload: Workload) -> Workload:
    """The same workload in words the dummy tokenizer knows (one token each)."""

    def words(text: str) -> str:
        return " ".join(vocab_word(w) for w in text.split())

    def turn(t: Turn) -> Turn:
        return replace(
            t, user=words(t.user), context=None if t.context is None else words(t.context)
        )

    conversations = tuple(
        replace(c, system=words(c.system), turns=tuple(turn(t) for t in c.turns))
        for c in workload.conversations
    )
    return Workload(workload.name, conversations)


def start(state: State, args: argparse.Namespace) -> None:
    """One replica after another: each sizes its KV cache from the memory it finds free, which
    a neighbour still loading would make wrong. Eager mode (no graph capture or compilation):
    a start in a minute, not three; the same for every router measured."""
    for i, url in enumerate(replica_urls(args.replicas)):
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(args.model_dir), "--served-model-name", MODEL,
            "--port", url.rsplit(":", 1)[1], "--load-format", "dummy",
            "--max-model-len", "8192", "--gpu-memory-utilization", str(args.gpu_share),
            "--enforce-eager", "--disable-uvicorn-access-log",
        ]  # fmt: skip
        launch(state, f"replica-{i}", command)
        asyncio.run(wait_all([url], args.start_timeout_s))


async def wait_all(urls: list[str], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as session:
        for url in urls:
            while True:
                try:
                    async with session.get(url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"{url} not ready within {within_s} s")
                await asyncio.sleep(1)
    print(f"{len(urls)} replicas ready", flush=True)


def router_command(name: str, urls: list[str], root: Path) -> list[str]:
    kind, _, rest = name.partition(":")
    policy, _, options = rest.partition(":")  # llmserve:cache_aware:load_slack=4,load_factor=1.5
    if kind == "llmserve":
        extra = [o.replace("=", ": ") for o in options.split(",") if o]
        routing = ", ".join([f"policy: {policy}", *extra])
        replicas = ", ".join(f"{{url: {u}}}" for u in urls)
        config = root / f"llmserve-{rest.replace(':', '-').replace(',', '-')}.yaml"
        config.write_text(
            "log_level: warning\nauth: {enabled: false}\nobservability: {access_log: false}\n"
            f"models:\n  - engine: openai\n    name: {MODEL}\n    replicas: [{replicas}]\n"
            f"    routing: {{{routing}}}\n    max_model_len: 8192\n"
            "    admission: {max_in_flight: 4096, max_waiting_requests: 4096}\n"
        )
        return [sys.executable, "-m", "llmserve", "serve", "--config", str(config), "--port",
                str(ROUTER_PORT)]  # fmt: skip
    if kind == "sglang":
        return [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *urls,
                "--policy", policy, "--host", "127.0.0.1", "--port", str(ROUTER_PORT)]  # fmt: skip
    raise SystemExit(f"unknown router {name}")


async def engine_counters(urls: list[str]) -> list[tuple[float, float]]:
    """Each replica's (prefix-cache hits, queries), in tokens, from its own /metrics."""
    found = []
    async with aiohttp.ClientSession() as session:
        for url in urls:
            async with session.get(url + "/metrics") as r:
                signals = parse_signals(await r.text())
            assert signals is not None, f"{url}/metrics has no vllm:* load"
            found.append((signals.prefix_hits or 0.0, signals.prefix_queries or 0.0))
    return found


def run_router(state: State, args: argparse.Namespace, name: str, seed: int) -> dict[str, Any]:
    urls = replica_urls(args.replicas)
    spec = Spec(users=args.users, users_per_s=args.users_per_s, seed=seed,
                turns=(3, 5), answer_tokens=(64, 192))  # fmt: skip
    workload = on_dummy_vocab(multi_turn(spec))
    log = (state.logs / f"router-{name.replace(':', '-')}.log").open("ab")
    router = subprocess.Popen(router_command(name, urls, state.root), stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        asyncio.run(wait_all([f"http://127.0.0.1:{ROUTER_PORT}"], 120))
        before = asyncio.run(engine_counters(urls))
        samples, seconds = asyncio.run(replay(f"http://127.0.0.1:{ROUTER_PORT}", MODEL, workload))
        after = asyncio.run(engine_counters(urls))
    finally:
        os.killpg(router.pid, signal.SIGTERM)
        router.wait(30)
    ok = [s for s in samples if s.ok]
    hits = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    queries = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
    ttft = distribution([s.ttft_s for s in ok])  # milliseconds out
    row = {
        "router": name,
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "hit_rate": sum(hits) / max(sum(queries), 1.0),
        "hit_rate_by_replica": [h / max(q, 1.0) for h, q in zip(hits, queries, strict=True)],
        "prompt_tokens_by_replica": queries,
        "ttft_p50_ms": ttft["p50"],
        "ttft_p99_ms": ttft["p99"],
        "output_tok_s": sum(s.tokens for s in ok) / seconds,
        "seconds": seconds,
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["start", "run", "stop"])
    parser.add_argument("routers", nargs="*")
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--gpu-share", type=float, default=0.28)
    parser.add_argument("--users", type=int, default=96)
    parser.add_argument("--users-per-s", type=float, default=4.0)
    parser.add_argument("--start-timeout-s", type=float, default=400)
    args = parser.parse_args()
    state = State(args.state / "fleet")
    if args.phase == "start":
        start(state, args)
    elif args.phase == "run":
        rows = state.results().get("fleet", [])
        for name in args.routers:
            rows.append(run_router(state, args, name, seed=1000 + len(rows)))
            state.save("fleet", rows)
    else:
        for name, pid in state.pids().items():
            if alive(pid):
                os.killpg(pid, signal.SIGTERM)
                print("stopped", name)


if __name__ == "__main__":
    main()
