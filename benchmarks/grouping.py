"""Grouping similar-length prompts at the API layer: on vs off, real vLLM CPU engine, one run.

Two llmserve servers with the embedded model run side by side, identical but for
``admission.group_window_s`` (0 = off). The in-flight cap (8) is below the offered concurrency
(24), so the gateway's queue, not vLLM's, decides the dispatch order, which is what grouping
changes. The workload mixes short (~15 token) and long (~600 token) prompts in a fixed random
order. Rounds are interleaved (A B, then B A). Writes benchmarks/results/grouping.{md,json,png}.

    .venv/bin/python -m benchmarks.grouping [--rounds 2] [--requests 72]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from benchmarks.loadgen import Job, LoadRun, run_closed_loop, wait_ready
from benchmarks.servers import stop_all
from llmserve.config import EMBEDDED_MODEL_NAME

RESULTS = Path(__file__).parent / "results"
CONCURRENCY = 24
IN_FLIGHT = 8
WINDOW_S = 0.05
BUCKETS = "[64, 256]"
SHORT = "Name a colour."
LONG = " ".join(["The history of lighthouses spans many centuries and coastlines."] * 60)


def config(window: float) -> Path:
    path = Path(tempfile.mkdtemp()) / "llmserve.yaml"
    path.write_text(
        "auth: {enabled: false}\n"
        "models:\n  - engine: vllm\n    engine_args: {max_model_len: 2048}\n"
        f"    admission: {{max_in_flight: {IN_FLIGHT}, group_window_s: {window}, "
        f"group_buckets: {BUCKETS}}}\n"
    )
    return path


def start(window: float, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmserve",
            "serve",
            "--config",
            str(config(window)),
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def workload(requests: int) -> list[Job]:
    rng = random.Random(7)
    return [
        Job(LONG if rng.random() < 0.5 else SHORT, rng.choice([16, 32])) for _ in range(requests)
    ]


async def benchmark(args: argparse.Namespace) -> list[LoadRun]:
    targets = {
        "grouping off": (0.0, 8311),
        f"grouping on ({int(WINDOW_S * 1000)} ms)": (WINDOW_S, 8312),
    }
    servers = [start(window, port) for window, port in targets.values()]
    runs: list[LoadRun] = []
    jobs = workload(args.requests)
    try:
        timeout = aiohttp.ClientTimeout(total=1800)
        async with aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
        ) as session:
            for _, port in targets.values():
                await wait_ready(session, f"http://127.0.0.1:{port}", "/ready")
                await run_closed_loop(
                    session, "warm-up", f"http://127.0.0.1:{port}", EMBEDDED_MODEL_NAME, jobs[:8], 8
                )
            for round_ in range(args.rounds):
                order = list(targets.items())
                if round_ % 2:
                    order.reverse()
                for name, (_, port) in order:
                    run = await run_closed_loop(
                        session,
                        name,
                        f"http://127.0.0.1:{port}",
                        EMBEDDED_MODEL_NAME,
                        jobs,
                        CONCURRENCY,
                    )
                    print(
                        f"{name:24s} {run.tokens_per_s:6.1f} tok/s  TTFT p50 "
                        f"{run.median('ttft_s') * 1000:6.0f} ms  e2e p50 "
                        f"{run.median('e2e_s') * 1000:6.0f} ms",
                        flush=True,
                    )
                    runs.append(run)
    finally:
        stop_all(servers)
    return runs


Row = tuple[str, float, float, float, float, float, int]


def report(runs: list[LoadRun], requests: int) -> None:
    RESULTS.mkdir(exist_ok=True)
    names = list(dict.fromkeys(r.target for r in runs))
    # (setting, output tok/s, TTFT p50, TTFT p99, e2e p50, e2e p99 in ms, rounds)
    rows: list[Row] = []
    for name in names:
        mine = [r for r in runs if r.target == name]
        t50, t99, e50, e99 = (
            statistics.median(r.pct(attr, q) for r in mine) * 1000
            for attr in ("ttft_s", "e2e_s")
            for q in (0.5, 0.99)
        )
        rows.append(
            (name, statistics.median(r.tokens_per_s for r in mine), t50, t99, e50, e99, len(mine))
        )
    lines = [
        "# Grouping similar-length prompts: on vs off (real vLLM CPU engine)",
        "",
        f"Embedded SmolLM2-135M-Instruct (vllm-cpu, fp32, eager), {os.cpu_count()} CPU cores. "
        f"{requests} streaming completions per round, {CONCURRENCY} concurrent clients, "
        f"gateway in-flight cap {IN_FLIGHT}; prompts half short (~15 tokens) and half long "
        f"(~600 tokens), 16 or 32 output tokens (ignore_eos). Grouping: window "
        f"{int(WINDOW_S * 1000)} ms, buckets {BUCKETS} prompt tokens.",
        "",
        "| setting | output tok/s | TTFT p50 | TTFT p99 | e2e p50 | e2e p99 | rounds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, tps, t50, t99, e50, e99, n in rows:
        lines.append(
            f"| {name} | {tps:.1f} | {t50:.0f} ms | {t99:.0f} ms | {e50:.0f} ms | "
            f"{e99:.0f} ms | {n} |"
        )
    off, on = rows[0], rows[1]
    lines += [
        "",
        f"Throughput ratio on/off: {on[1] / off[1]:.3f}; TTFT p50 ratio on/off: "
        f"{on[2] / off[2]:.3f}. Medians over interleaved rounds.",
        "",
    ]
    (RESULTS / "grouping.md").write_text("\n".join(lines))
    raw = [
        {
            "target": r.target,
            "seconds": r.seconds,
            "tokens_per_s": r.tokens_per_s,
            "results": [vars_(x) for x in r.results],
        }
        for r in runs
    ]
    (RESULTS / "grouping.json").write_text(json.dumps(raw, indent=1))
    plot(rows)
    print("\n".join(lines))


def vars_(result: object) -> dict[str, float]:
    return {k: getattr(result, k) for k in ("tokens", "ttft_s", "e2e_s", "status")}


def plot(rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    names = [str(r[0]) for r in rows]
    left.bar(names, [float(r[1]) for r in rows])
    left.set_ylabel("output tokens/s")
    left.set_title("Throughput")
    for i, label in enumerate(("TTFT p50", "TTFT p99", "e2e p50", "e2e p99")):
        right.bar(
            [x + i * 0.2 for x in range(len(rows))],
            [float(r[2 + i]) for r in rows],
            0.2,
            label=label,
        )
    right.set_xticks([x + 0.3 for x in range(len(rows))], names)
    right.set_ylabel("ms")
    right.set_title("Latency")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "grouping.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=72)
    args = parser.parse_args()
    report(asyncio.run(benchmark(args)), args.requests)


if __name__ == "__main__":
    main()
