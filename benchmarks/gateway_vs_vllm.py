"""Tokens/s through llmserve vs vLLM's own OpenAI server, same model, same machine, one run.

Both servers run the embedded SmolLM2-135M with the same engine settings (fp32, eager, 2048-token
context). Runs are interleaved (A B, then B A) after a warm-up; the report gives the median over
rounds and the ratio. Writes benchmarks/results/gateway-vs-vllm.{md,json,png}.

    .venv/bin/python -m benchmarks.gateway_vs_vllm [--rounds 2] [--concurrency 1 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from benchmarks.loadgen import Job, run_closed_loop, wait_ready
from benchmarks.servers import stop_all, vllm_server_command
from llmserve.config import EMBEDDED_MODEL_NAME, Settings
from llmserve.embedded.smollm2 import ensure_embedded_model

RESULTS = Path(__file__).parent / "results"
MAX_MODEL_LEN = 2048
OUTPUT_TOKENS = 64
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass
class Run:
    target: str
    concurrency: int
    tokens: int
    seconds: float
    ttfts: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def start_servers(model_dir: Path, vllm_port: int, gw_port: int) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    vllm = subprocess.Popen(
        vllm_server_command(model_dir, vllm_port, MAX_MODEL_LEN),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    config = Path(tempfile.mkdtemp()) / "llmserve.yaml"
    config.write_text(
        "auth: {enabled: false}\n"
        f"models:\n  - engine: vllm\n    engine_args: {{max_model_len: {MAX_MODEL_LEN}}}\n"
    )
    gateway = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmserve",
            "serve",
            "--config",
            str(config),
            "--port",
            str(gw_port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return [vllm, gateway]


async def run_load(
    session: aiohttp.ClientSession, target: str, url: str, concurrency: int, requests: int
) -> Run:
    """The shared closed-loop load generator, summarised the way this report needs."""
    jobs = [Job(PROMPT, OUTPUT_TOKENS)] * requests
    load = await run_closed_loop(session, target, url, EMBEDDED_MODEL_NAME, jobs, concurrency)
    if len(load.ok) != requests:
        raise RuntimeError(f"{target}: {requests - len(load.ok)} request(s) failed")
    ttfts = [r.ttft_s for r in load.ok]
    return Run(target, concurrency, sum(r.tokens for r in load.ok), load.seconds, ttfts)


async def benchmark(args: argparse.Namespace) -> list[Run]:
    model_dir = ensure_embedded_model(Settings().cache_dir)
    servers = start_servers(model_dir, args.vllm_port, args.gateway_port)
    targets = {
        "vllm serve (direct)": f"http://127.0.0.1:{args.vllm_port}",
        "llmserve (in-process vLLM)": f"http://127.0.0.1:{args.gateway_port}",
    }
    runs: list[Run] = []
    try:
        timeout = aiohttp.ClientTimeout(total=900)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await wait_ready(session, targets["vllm serve (direct)"], "/health")
            await wait_ready(session, targets["llmserve (in-process vLLM)"], "/ready")
            for url in targets.values():  # warm-up
                await run_load(session, "warm-up", url, 2, 2)
            for concurrency in args.concurrency:
                requests = max(4, concurrency * 2)
                for round_ in range(args.rounds):
                    order = list(targets.items())
                    if round_ % 2:
                        order.reverse()
                    for name, url in order:
                        run = await run_load(session, name, url, concurrency, requests)
                        print(
                            f"{name:28s} c={concurrency:3d} {run.tokens_per_s:7.1f} tok/s "
                            f"TTFT p50 {statistics.median(run.ttfts) * 1000:6.0f} ms",
                            flush=True,
                        )
                        runs.append(run)
    finally:
        stop_all(servers)
    return runs


def report(runs: list[Run]) -> None:
    RESULTS.mkdir(exist_ok=True)
    rows = []
    for concurrency in sorted({r.concurrency for r in runs}):
        direct = [r for r in runs if r.concurrency == concurrency and r.target.startswith("vllm")]
        gateway = [r for r in runs if r.concurrency == concurrency and r.target.startswith("llm")]
        d = statistics.median(r.tokens_per_s for r in direct)
        g = statistics.median(r.tokens_per_s for r in gateway)
        d_ttft = statistics.median(t for r in direct for t in r.ttfts) * 1000
        g_ttft = statistics.median(t for r in gateway for t in r.ttfts) * 1000
        rows.append((concurrency, d, g, g / d, d_ttft, g_ttft, len(direct)))
    lines = [
        "# llmserve vs vLLM's own OpenAI server (same model, same machine, interleaved)",
        "",
        f"Model: embedded SmolLM2-135M-Instruct, fp32, eager, max_model_len {MAX_MODEL_LEN}; "
        f"{OUTPUT_TOKENS} output tokens per request (ignore_eos), streaming completions. "
        f"Machine: {os.cpu_count()} CPU cores, no GPU. Python {sys.version.split()[0]}.",
        "",
        "| streams | vLLM direct tok/s | llmserve tok/s | ratio | TTFT p50 direct | "
        "TTFT p50 llmserve | rounds |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, d, g, ratio, dt, gt, n in rows:
        lines.append(f"| {c} | {d:.1f} | {g:.1f} | {ratio:.3f} | {dt:.0f} ms | {gt:.0f} ms | {n} |")
    lines += [
        "",
        "Medians over rounds; each round runs both targets back to back, order "
        "alternating. Raw runs: `gateway-vs-vllm.json`.",
        "",
    ]
    (RESULTS / "gateway-vs-vllm.md").write_text("\n".join(lines))
    raw = [
        {
            "target": r.target,
            "concurrency": r.concurrency,
            "tokens": r.tokens,
            "seconds": r.seconds,
            "tokens_per_s": r.tokens_per_s,
            "ttfts": r.ttfts,
        }
        for r in runs
    ]
    (RESULTS / "gateway-vs-vllm.json").write_text(json.dumps(raw, indent=1))
    plot(rows)
    print("\n".join(lines))


def plot(rows: list[tuple[int, float, float, float, float, float, int]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    labels = [str(r[0]) for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([i - 0.2 for i in x], [r[1] for r in rows], 0.4, label="vLLM direct")
    ax.bar([i + 0.2 for i in x], [r[2] for r in rows], 0.4, label="llmserve")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput: llmserve vs vLLM's OpenAI server")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "gateway-vs-vllm.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--vllm-port", type=int, default=8301)
    parser.add_argument("--gateway-port", type=int, default=8302)
    report(asyncio.run(benchmark(parser.parse_args())))


if __name__ == "__main__":
    main()
