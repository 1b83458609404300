"""The original claim, measured: vLLM versus a plain Hugging Face transformers server, same model,
same machine, same concurrent streaming workload ("3-5x throughput improvement", says the design).

Targets, each started alone in turn (never two at once: each gets all the cores), warmed up, run
through every concurrency, then stopped:

- ``vllm``: vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``) with the
  same engine settings as ``gateway_vs_vllm.py``: fp32, ``--enforce-eager``, max_model_len 2048,
  ``VLLM_CPU_KVCACHE_SPACE=1``, everything else vLLM's defaults (continuous batching).
- ``hf``: ``benchmarks/hf_server.py``, a plain transformers server: ``model.generate`` with a
  ``TextIteratorStreamer`` in a worker thread, one request at a time (a lock), fp32.
- ``hf-batched``: the same server with static batching (``--batch 8``): requests
  waiting when the model frees up run as one padded batch, to the end of its longest row.

The model is the embedded SmolLM2-135M-Instruct (fp32 safetensors). Workload: one fixed prompt of
about 100 tokens, 64 output tokens per request (``ignore_eos``, greedy), streaming completions, at
each concurrency a closed loop of ``--requests-per-stream`` requests per stream (at least
``--min-requests``), cut short after ``--cell-limit-s``. Measured per cell: output tokens/s,
requests/s, TTFT p50/p99, end-to-end latency p50, and the CPU used by the server, by the load
generator and by anything else (interference: a cell is run once more when other processes took
more than ``--max-other-cpu-pct`` of the machine). Before the load, one greedy non-streaming
request per target checks that the servers compute the same text. Writes
benchmarks/results/hf-vs-vllm.{md,json,png}.

    .venv/bin/python -m benchmarks.hf_vs_vllm [--concurrency 1 4 8] [--targets vllm hf hf-batched]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchmarks import loadgen
from benchmarks.servers import vllm_server_command
from llmserve.config import EMBEDDED_MODEL_NAME, Settings
from llmserve.embedded.smollm2 import ensure_embedded_model

RESULTS = Path(__file__).parent / "results"
MAX_MODEL_LEN = 2048
OUTPUT_TOKENS = 64
# About 100 tokens with SmolLM2's tokenizer (the exact count, from the servers' usage, is reported).
PROMPT = (
    "You are the keeper of a lighthouse on a small rocky island far from the mainland. Every "
    "evening you climb the spiral stairs, trim the wick, polish the great lens and watch the ships "
    "pass in the dark. One stormy morning, after a long night of wind and rain, you walk along the "
    "shore and find a green glass bottle wedged between two stones. Inside it there is a rolled "
    "letter, written in faded ink, addressed to you by name. Tell the story of what the letter "
    "says and what you do next."
)
# For the correctness check: greedy decoding does not reach EOS within 32 tokens.
CHECK_PROMPT = "Once upon a time, in a small village by the sea,"
BATCH = 8
TARGETS = ("vllm", "hf", "hf-batched")
WARM_UP = 4


@dataclass
class Cell:
    target: str
    concurrency: int
    seconds: float
    results: list[dict[str, Any]]
    # CPU seconds over the cell: the server's process tree, this load generator, and everything
    # else on the machine (which should be about nothing: the 2 cores are the servers').
    server_cpu_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    attempt: int = 1
    waited_for_quiet_s: float = 0.0

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r["ok"]]

    def pct(self, key: str, q: float) -> float:
        values: list[float] = sorted(r[key] for r in self.ok)
        if not values:
            return float("nan")
        # nearest-rank percentile
        return values[max(0, min(len(values) - 1, round(q * len(values) + 0.5) - 1))]

    def summary(self) -> dict[str, Any]:
        tokens = sum(r["tokens"] for r in self.ok)
        return {
            "target": self.target,
            "concurrency": self.concurrency,
            "requests": len(self.results),
            "ok": len(self.ok),
            "seconds": self.seconds,
            "output_tokens": tokens,
            "tokens_per_s": tokens / self.seconds,
            "requests_per_s": len(self.ok) / self.seconds,
            "ttft_p50_ms": self.pct("ttft_s", 0.5) * 1000,
            "ttft_p99_ms": self.pct("ttft_s", 0.99) * 1000,
            "e2e_p50_ms": self.pct("e2e_s", 0.5) * 1000,
            "server_cpu_s": self.server_cpu_s,
            "server_cpu_ms_per_token": self.server_cpu_s * 1000 / tokens if tokens else None,
            "loadgen_cpu_s": self.loadgen_cpu_s,
            "other_cpu_s": self.other_cpu_s,
            "other_cpu_pct": 100 * self.other_cpu_s / (self.seconds * (os.cpu_count() or 1)),
            "attempt": self.attempt,
            "waited_for_quiet_s": self.waited_for_quiet_s,
        }


def tree_cpu(process: psutil.Process) -> float:
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def busy_cpu() -> float:
    times = psutil.cpu_times()
    return (
        times.user
        + times.nice
        + times.system
        + getattr(times, "irq", 0.0)
        + getattr(times, "softirq", 0.0)
        + getattr(times, "steal", 0.0)
    )


async def wait_quiet(limit_s: float, cores: float = 0.3) -> float:
    """Wait (up to ``limit_s``) until the machine's busy CPU falls under ``cores`` over one
    second: other work on the 2 cores would skew the cell. Returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        before = busy_cpu()
        await asyncio.sleep(1.0)
        if busy_cpu() - before < cores:
            break
    return time.monotonic() - start


class CpuMeter:
    """CPU used by the server's process tree, by this process and by the rest of the machine."""

    def __init__(self, server_pid: int | None) -> None:
        self.server = psutil.Process(server_pid) if server_pid else None
        self.me = psutil.Process()

    def read(self) -> tuple[float, float, float]:
        server = tree_cpu(self.server) if self.server else 0.0
        me = self.me.cpu_times()
        return server, me.user + me.system, busy_cpu()

    @staticmethod
    def apply(
        cell: Cell, before: tuple[float, float, float], after: tuple[float, float, float]
    ) -> None:
        cell.server_cpu_s = after[0] - before[0]
        cell.loadgen_cpu_s = after[1] - before[1]
        cell.other_cpu_s = max(0.0, (after[2] - before[2]) - cell.server_cpu_s - cell.loadgen_cpu_s)


def server_command(target: str, model_dir: Path, port: int) -> list[str]:
    if target == "vllm":
        return vllm_server_command(model_dir, port, MAX_MODEL_LEN)
    batch = BATCH if target == "hf-batched" else 1
    return [
        sys.executable,
        "-m",
        "benchmarks.hf_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        EMBEDDED_MODEL_NAME,
        "--dtype",
        "float32",
        "--port",
        str(port),
        "--batch",
        str(batch),
    ]


def start_server(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=out)


def stop_server(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def ok(result: Any) -> bool:
    return result.status == 200 and getattr(result, "error", None) is None and result.tokens > 0


async def run_cell(
    session: aiohttp.ClientSession,
    target: str,
    url: str,
    concurrency: int,
    requests: int,
    limit_s: float,
    meter: CpuMeter | None = None,
) -> Cell:
    """``concurrency`` streams in a closed loop over ``requests`` requests; no new request
    after ``limit_s``."""
    remaining = requests
    job = loadgen.Job(PROMPT, OUTPUT_TOKENS)
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    deadline = start + limit_s

    async def stream() -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            r = await loadgen.one_request(session, url, EMBEDDED_MODEL_NAME, job)
            results.append(
                {
                    "ok": ok(r),
                    "status": r.status,
                    "tokens": r.tokens,
                    "prompt_tokens": getattr(r, "prompt_tokens", None),
                    "ttft_s": r.ttft_s,
                    "e2e_s": r.e2e_s,
                    "error": getattr(r, "error", None),
                }
            )

    before = meter.read() if meter else None
    await asyncio.gather(*(stream() for _ in range(concurrency)))
    cell = Cell(target, concurrency, time.perf_counter() - start, results)
    if meter and before:
        meter.apply(cell, before, meter.read())
    return cell


async def greedy_text(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """Greedy text for CHECK_PROMPT, without ``ignore_eos``: the two servers implement that
    differently (vLLM samples EOS and carries on, hiding it from the text; the HF server forbids
    EOS with ``min_new_tokens``), so with it their texts part at the first EOS by design."""
    body = {
        "model": EMBEDDED_MODEL_NAME,
        "prompt": CHECK_PROMPT,
        "max_tokens": 32,
        "temperature": 0,
    }
    async with session.post(url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        payload = await response.json()
    return {"text": payload["choices"][0]["text"], "usage": payload.get("usage")}


async def bench_target(
    target: str, model_dir: Path, args: argparse.Namespace
) -> tuple[list[Cell], dict[str, Any]]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = Path(tempfile.gettempdir()) / f"hf-vs-vllm-{target}.log"
    url = f"http://127.0.0.1:{args.port}"
    await wait_quiet(args.quiet_wait_s)
    started = time.monotonic()
    server = start_server(server_command(target, model_dir, args.port), env, log)
    info: dict[str, Any] = {"log": str(log)}
    cells: list[Cell] = []
    try:
        timeout = aiohttp.ClientTimeout(total=600)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await loadgen.wait_ready(session, url, "/health")
            info["ready_s"] = time.monotonic() - started
            print(f"{target}: ready in {info['ready_s']:.0f} s", flush=True)
            info["greedy"] = await greedy_text(session, url)
            # Warm-up: one request alone, then one concurrent round.
            await run_cell(session, "warm-up", url, 1, 1, args.cell_limit_s)
            await run_cell(session, "warm-up", url, WARM_UP, WARM_UP, args.cell_limit_s)
            meter = CpuMeter(server.pid)
            for concurrency in args.concurrency:
                requests = max(args.min_requests, args.requests_per_stream * concurrency)
                for attempt in range(2):  # once more if something else took the CPU
                    waited = await wait_quiet(args.quiet_wait_s)
                    cell = await run_cell(
                        session, target, url, concurrency, requests, args.cell_limit_s, meter
                    )
                    cell.attempt, cell.waited_for_quiet_s = attempt + 1, waited
                    if cell.summary()["other_cpu_pct"] <= args.max_other_cpu_pct:
                        break
                    print(f"{target} c={concurrency}: interference, running it again")
                s = cell.summary()
                print(
                    f"{target:11s} c={concurrency:2d} n={s['ok']:3d} "
                    f"{s['tokens_per_s']:6.1f} tok/s {s['requests_per_s']:5.2f} req/s "
                    f"TTFT p50 {s['ttft_p50_ms']:6.0f} ms p99 {s['ttft_p99_ms']:6.0f} ms "
                    f"e2e p50 {s['e2e_p50_ms']:6.0f} ms ({cell.seconds:.0f} s, "
                    f"other CPU {s['other_cpu_pct']:.0f}%)",
                    flush=True,
                )
                cells.append(cell)
    finally:
        await asyncio.to_thread(stop_server, server)
    return cells, info


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def setup(model_dir: Path, args: argparse.Namespace, cells: list[Cell]) -> dict[str, Any]:
    import torch

    prompt_tokens = sorted({str(r["prompt_tokens"]) for c in cells for r in c.ok})
    return {
        "model": f"{EMBEDDED_MODEL_NAME} (SmolLM2-135M-Instruct, fp32 safetensors)",
        "model_dir": str(model_dir),
        "dtype": "float32",
        "vllm_args": "--dtype float32 --enforce-eager --max-model-len 2048 (eager, no "
        "torch.compile / CUDA-graph-style capture); VLLM_CPU_KVCACHE_SPACE=1; other settings "
        "vLLM's defaults",
        "hf_server": f"benchmarks/hf_server.py: transformers generate + TextIteratorStreamer "
        f"(per-token flush), fp32, eager PyTorch, default attention; plain = one request at "
        f"a time (lock); hf-batched = static batches of up to {BATCH}",
        "torch_threads": torch.get_num_threads(),
        "workload": f"streaming /v1/completions, one fixed prompt "
        f"({' / '.join(prompt_tokens)} tokens, the servers' count), {OUTPUT_TOKENS} output "
        "tokens (ignore_eos, temperature 0), closed loop, "
        f"{args.requests_per_stream} requests per stream (at least {args.min_requests}), "
        f"no new request after {args.cell_limit_s:.0f} s",
        "warm_up": f"one request alone, then {WARM_UP} at once",
        "order": "targets one after the other, each alone on the machine",
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": version("torch"),
        "transformers": version("transformers"),
        "vllm-cpu": version("vllm-cpu"),
        "aiohttp": version("aiohttp"),
        "platform": platform.platform(),
    }


async def benchmark(args: argparse.Namespace) -> tuple[list[Cell], dict[str, Any]]:
    model_dir = ensure_embedded_model(Settings().cache_dir)
    targets = args.targets
    cells: list[Cell] = []
    infos: dict[str, Any] = {}
    for target in targets:
        target_cells, infos[target] = await bench_target(target, model_dir, args)
        cells += target_cells
    return cells, {"setup": setup(model_dir, args, cells), "servers": infos}


def report(cells: list[Cell], meta: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    summaries = [c.summary() for c in cells]
    by = {(s["target"], s["concurrency"]): s for s in summaries}
    targets = list(dict.fromkeys(s["target"] for s in summaries))
    concurrencies = sorted({s["concurrency"] for s in summaries})
    ratios = []
    for c in concurrencies:
        row: dict[str, Any] = {"concurrency": c}
        v = by.get(("vllm", c))
        for t in targets:
            if t != "vllm" and v and (h := by.get((t, c))):
                row[f"vllm_over_{t}"] = v["tokens_per_s"] / h["tokens_per_s"]
        ratios.append(row)
    greedy = {t: i.get("greedy", {}).get("text") for t, i in meta["servers"].items()}
    same_text = len(set(greedy.values())) == 1
    s = meta["setup"]
    lines = [
        "# The original claim: vLLM vs a plain Hugging Face transformers server",
        "",
        "Same model, same machine, same streaming workload; each server alone on the machine.",
        "",
        f"- Model: {s['model']}, dtype {s['dtype']}.",
        f"- vLLM: vllm-cpu {s['vllm-cpu']}, OpenAI server, {s['vllm_args']}.",
        f"- HF: {s['hf_server']}; transformers {s['transformers']}, torch {s['torch']} "
        f"({s['torch_threads']} intra-op threads).",
        f"- Machine: {s['cpu']} ({', '.join(s['cpu_flags'])}), {s['cpu_count']} CPU cores, no "
        f"GPU; Python {s['python']}, aiohttp {s['aiohttp']}.",
        f"- Workload: {s['workload']}. Warm-up: {s['warm_up']}.",
        "",
        "| target | streams | requests | output tok/s | req/s | TTFT p50 | TTFT p99 | e2e p50 | "
        "server CPU / token | other CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in concurrencies:
        for t in targets:
            if x := by.get((t, c)):
                lines.append(
                    f"| {t} | {c} | {x['ok']}/{x['requests']} | {x['tokens_per_s']:.1f} | "
                    f"{x['requests_per_s']:.3f} | {x['ttft_p50_ms']:.0f} ms | "
                    f"{x['ttft_p99_ms']:.0f} ms | {x['e2e_p50_ms']:.0f} ms | "
                    f"{x['server_cpu_ms_per_token'] or float('nan'):.0f} ms | "
                    f"{x['other_cpu_pct']:.0f}% |"
                )
    others = [t for t in targets if t != "vllm"]
    lines += [
        "",
        "Throughput ratio, vLLM ÷ HF (output tokens/s):",
        "",
        "| streams | " + " | ".join(f"vLLM ÷ {t}" for t in others) + " |",
        "|---:|" + "---:|" * len(others),
    ]
    for row in ratios:
        cols = [row.get(f"vllm_over_{t}") for t in others]
        lines.append(
            f"| {row['concurrency']} | "
            + " | ".join("-" if v is None else f"{v:.2f}x" for v in cols)
            + " |"
        )
    lines += [
        "",
        f"Correctness check (greedy, 32 tokens, non-streaming, `{CHECK_PROMPT}`): the targets' "
        f"texts are {'identical' if same_text else 'NOT identical (see the JSON)'}. "
        "`ignore_eos` differs by design: vLLM samples EOS and carries on (hiding it from the "
        "text), the HF server forbids EOS (`min_new_tokens`); both produce exactly 64 tokens "
        "per request at the same cost per step, so throughput is comparable.",
        "",
        "p99 with this few requests per cell is close to the maximum. Server CPU / token: the "
        "server's process tree (user + system) per output token. Other CPU: the share of the "
        "machine's CPU used by anything but the server and the load generator during the cell "
        "(interference; should be near 0). Raw per-request results: `hf-vs-vllm.json`.",
        "",
    ]
    (RESULTS / "hf-vs-vllm.md").write_text("\n".join(lines))
    raw = {
        **meta,
        "greedy_identical": same_text,
        "summary": summaries,
        "ratios": ratios,
        "cells": [
            {
                "target": c.target,
                "concurrency": c.concurrency,
                "seconds": c.seconds,
                "results": c.results,
            }
            for c in cells
        ],
    }
    (RESULTS / "hf-vs-vllm.json").write_text(json.dumps(raw, indent=1))
    plot(summaries, targets, concurrencies)
    print("\n".join(lines))


def plot(summaries: list[dict[str, Any]], targets: list[str], concurrencies: list[int]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return
    by = {(s["target"], s["concurrency"]): s for s in summaries}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for t in targets:
        xs = [c for c in concurrencies if (t, c) in by]
        left.plot(xs, [by[t, c]["tokens_per_s"] for c in xs], marker="o", label=t)
        right.plot(xs, [by[t, c]["ttft_p50_ms"] for c in xs], marker="o", label=t)
    for ax in (left, right):
        ax.set_xticks(concurrencies)
        ax.set_xlabel("concurrent streams")
        ax.legend()
        ax.grid(alpha=0.3)
    left.set_ylabel("output tokens/s")
    left.set_title("Throughput")
    right.set_yscale("log")
    right.set_ylabel("TTFT p50 (ms, log scale)")
    right.set_title("Time to first token")
    fig.suptitle("vLLM vs plain HF transformers, SmolLM2-135M fp32, same CPU machine")
    fig.tight_layout()
    fig.savefig(RESULTS / "hf-vs-vllm.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=6)
    parser.add_argument("--cell-limit-s", type=float, default=60.0)
    parser.add_argument(
        "--targets", nargs="+", choices=TARGETS, default=list(TARGETS), help="run in this order"
    )
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument(
        "--quiet-wait-s", type=float, default=60.0, help="wait for an idle machine before a cell"
    )
    parser.add_argument(
        "--max-other-cpu-pct",
        type=float,
        default=10.0,
        help="run a cell once more when other processes used more of the machine than this",
    )
    args = parser.parse_args()
    report(*asyncio.run(benchmark(args)))


if __name__ == "__main__":
    main()
