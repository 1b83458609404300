"""Tables from the GPU suite's results.json (``suite.py``), as Markdown, on any machine.

    python3 -m benchmarks.gpu.report RESULTS.json [OUT.md]

Per workload and concurrency: each target's median over rounds of output tokens/s, TTFT and ITL
p50/p99 (each run's percentiles, then the median over runs), and the ratio to direct, taken per
round (target / direct of the same round) and then the median, with the per-round ratios beside it
so that run-to-run noise shows. A run in which requests failed is left out of the medians (and
named in the table).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

LABELS = {
    "direct": "vllm serve (direct)",
    "upstream": "llmserve → vllm serve (upstream)",
    "inproc": "llmserve in-process vLLM",
}
WORKLOAD_TITLES = {
    "long": "in 1024 / out 128, streaming completions",
    "chat": "chat-shaped: ~64-token user message (+5 template tokens) / out 128, streaming chat",
}


def _med(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _p(summary: dict[str, Any], metric: str, q: str) -> float:
    value = summary[metric][q]
    return float("nan") if value is None else float(value)


def compare_table(section: dict[str, Any]) -> list[str]:
    runs = section["runs"]
    lines: list[str] = []
    for c in sorted({r["concurrency"] for r in runs}):
        mine = [r for r in runs if r["concurrency"] == c]
        rounds = sorted({r["round"] for r in mine})
        lines += [
            f"**{c} concurrent streams** ({mine[0]['requests']} requests per run, "
            f"{len(rounds)} rounds)",
            "",
            "| target | output tok/s | ratio to direct (per round) | TTFT p50 | TTFT p99 | "
            "ITL p50 | ITL p99 | TPOT p50 | failed requests |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        # A run with failed requests measures the failure, not the path: left out of the
        # medians and ratios, and counted in the last column.
        clean = [r for r in mine if not r["errors"]]
        direct = {r["round"]: r for r in clean if r["target"] == "direct"}
        for target in ("direct", "upstream", "inproc"):
            runs_t = [r for r in clean if r["target"] == target]
            failed = [r for r in mine if r["target"] == target and r["errors"]]
            if not runs_t:
                continue
            tps = [r["output_token_throughput"] for r in runs_t]
            ratios = [
                r["output_token_throughput"] / direct[r["round"]]["output_token_throughput"]
                for r in runs_t
                if r["round"] in direct and direct[r["round"]]["output_token_throughput"]
            ]
            ratio = (
                "1"
                if target == "direct"
                else f"**{_med(ratios):.3f}** ({', '.join(f'{x:.2f}' for x in ratios)})"
            )
            errors = (
                f"{sum(sum(r['errors'].values()) for r in failed)} in round(s) "
                f"{', '.join(str(r['round']) for r in failed)} (left out)"
                if failed
                else "0"
            )
            lines.append(
                f"| {LABELS[target]} | {_med(tps):,.0f} ({min(tps):,.0f} to {max(tps):,.0f}) | "
                f"{ratio} | "
                f"{_med([_p(r, 'ttft_ms', 'p50') for r in runs_t]):,.0f} ms | "
                f"{_med([_p(r, 'ttft_ms', 'p99') for r in runs_t]):,.0f} ms | "
                f"{_med([_p(r, 'itl_ms', 'p50') for r in runs_t]):.2f} ms | "
                f"{_med([_p(r, 'itl_ms', 'p99') for r in runs_t]):.2f} ms | "
                f"{_med([_p(r, 'tpot_ms', 'p50') for r in runs_t]):.2f} ms | {errors} |"
            )
        lines.append("")
    return lines


CPU_COLUMNS = (
    ("direct", "vllm serve API process"),
    ("direct children", "vllm serve engine core"),
    ("upstream", "llmserve upstream process"),
    ("inproc", "llmserve in-process main process"),
    ("inproc children", "in-process engine core"),
)


def cpu_table(section: dict[str, Any]) -> list[str]:
    """Median CPU cores each server process kept busy during each target's runs."""
    runs = [r for r in section["runs"] if "cpu_cores" in r and not r["errors"]]
    if not runs:
        return []
    lines = [
        "CPU cores busy during the runs (median over rounds; user + system time / run time):",
        "",
        "| streams | target | " + " | ".join(label for _, label in CPU_COLUMNS) + " |",
        "|---:|---|" + "---:|" * len(CPU_COLUMNS),
    ]
    for c in sorted({r["concurrency"] for r in runs}):
        for target in ("direct", "upstream", "inproc"):
            mine = [r for r in runs if r["concurrency"] == c and r["target"] == target]
            if not mine:
                continue
            cells = [
                f"{_med([r['cpu_cores'].get(key, 0.0) for r in mine]):.2f}"
                for key, _ in CPU_COLUMNS
            ]
            lines.append(f"| {c} | {LABELS[target]} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def profile_summary(path: Path, seconds: float, rate: float = 100) -> str:
    """One line per py-spy raw (collapsed-stack) profile: how busy the process was and where
    its own time went, by top-level package of the innermost frame."""
    packages: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        leaf = stack.split(";")[-1]
        where = leaf[leaf.rfind("(") + 1 :].split(":")[0] if "(" in leaf else "?"
        package = where.split("/")[0] or "?"
        packages[package] = packages.get(package, 0) + int(count)
        total += int(count)
    top = sorted(packages.items(), key=lambda kv: -kv[1])[:6]
    shares = ", ".join(f"{name} {100 * n / total:.0f} %" for name, n in top)
    return f"{total} samples = {total / (seconds * rate):.0%} of one core; own time in: {shares}"


def render(results: dict[str, Any]) -> str:
    v = results.get("versions", {})
    lines = [
        "## Versions and card (as read on the host)",
        "",
        f"- GPU: {v.get('nvidia-smi', '?')}; {v.get('cpus', '?')} CPU cores",
        f"- Python {v.get('python')}, torch {v.get('torch')}, vLLM {v.get('vllm')}, "
        f"transformers {v.get('transformers')}, tokenizers {v.get('tokenizers')}, "
        f"triton {v.get('triton')}",
        f"- FastAPI {v.get('fastapi')}, Starlette {v.get('starlette')}, uvicorn "
        f"{v.get('uvicorn')}, pydantic {v.get('pydantic')}, aiohttp {v.get('aiohttp')}, "
        f"orjson {v.get('orjson')}, uvloop {v.get('uvloop')}, nvidia-ml-py "
        f"{v.get('nvidia-ml-py')}",
        "",
    ]
    start = results.get("start")
    if start:
        lines += [
            "## Start",
            "",
            f"Engine settings (both engines): `{json.dumps(start['engine_args'])}`. Both "
            f"started at once: `vllm serve` answered /health after "
            f"{start['direct_ready_s']:.0f} s, llmserve in-process /ready after "
            f"{start['inproc_ready_s']:.0f} s"
            + (
                " (its first attempt beside `vllm serve` failed and it was started again: "
                f"`{start['inproc_first_attempt'][-300:]}`)"
                if "inproc_first_attempt" in start
                else ""
            )
            + ".",
            "",
        ]
    smoke = results.get("smoke")
    if smoke:
        lines += ["## (a) llmserve in-process on the GPU: smoke checks", ""]
        lines += ["| check | result | detail |", "|---|---|---|"]
        for c in smoke["checks"]:
            detail = json.dumps(c["detail"])[:160].replace("|", "\\|")
            lines.append(f"| {c['check']} | {'pass' if c['ok'] else '**FAIL**'} | `{detail}` |")
        lines.append("")
    for workload, title in WORKLOAD_TITLES.items():
        section = results.get(workload)
        if section:
            lines += [f"## (b) Throughput and latency: {title}", ""]
            lines += compare_table(section)
            lines += cpu_table(section)
    nvml = [s for w in ("long", "chat") for s in (results.get(w) or {}).get("nvml", [])]
    if nvml:
        lines += [
            "## (e) NVML gauges in llmserve's /metrics vs nvidia-smi (same moment)",
            "",
            "| when | memory used: llmserve / nvidia-smi | memory total: llmserve / "
            "nvidia-smi | utilisation: llmserve / nvidia-smi |",
            "|---|---:|---:|---:|",
        ]
        for s in nvml:
            lines.append(
                f"| {s['when']} | {s['llmserve_memory_used_mib']:,.0f} / "
                f"{s['smi_memory_used_mib']:,.0f} MiB | {s['llmserve_memory_total_mib']:,.0f} / "
                f"{s['smi_memory_total_mib']:,.0f} MiB | {s['llmserve_utilization_pct']:.0f} / "
                f"{s['smi_utilization_pct']:.0f} % |"
            )
        lines.append("")
    admission = results.get("admission")
    if admission:
        lines += [
            "## (c) Admission under GPU load",
            "",
            f"Open loop, Poisson arrivals at {admission['rate']:g} req/s, "
            f"{admission['requests']} requests of in 1024 / out 128, through llmserve upstream "
            f"mode. Bounded model: max_in_flight {admission['max_in_flight']}, "
            f"max_waiting_requests {admission['max_waiting_requests']}.",
            "",
            "| queue | completed | 503 | Retry-After values | 503 answered in (p50 / p99) | "
            "admitted TTFT p50 / p99 | admitted ITL p50 / p99 | admitted e2e p50 / p99 | "
            "output tok/s |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for label, s in admission["runs"].items():
            rej = s["reject_latency_ms"]
            reject = "—" if rej["p50"] is None else f"{rej['p50']:.1f} / {rej['p99']:.1f} ms"
            lines.append(
                f"| {label} | {s['completed']} | {s['rejected_503']} | "
                f"{s['retry_after_values'] or '—'} | {reject} | "
                f"{_p(s, 'ttft_ms', 'p50'):,.0f} / {_p(s, 'ttft_ms', 'p99'):,.0f} ms | "
                f"{_p(s, 'itl_ms', 'p50'):.1f} / {_p(s, 'itl_ms', 'p99'):.1f} ms | "
                f"{_p(s, 'e2e_ms', 'p50'):,.0f} / {_p(s, 'e2e_ms', 'p99'):,.0f} ms | "
                f"{s['output_token_throughput']:,.0f} |"
            )
        lines.append("")
    grouping = results.get("grouping")
    if grouping:
        lines += [
            "## (d) Grouping similar-length prompts at the gateway, on the GPU",
            "",
            f"llmserve upstream mode, max_in_flight {grouping['max_in_flight']}, "
            f"{grouping['clients']} closed-loop clients, {grouping['requests']} requests per run "
            f"(half ~16-token, half ~1024-token prompts, 64 output tokens); grouping window "
            f"{grouping['window_s'] * 1000:.0f} ms, buckets {grouping['buckets']}. Medians over "
            "interleaved rounds.",
            "",
            "| setting | output tok/s | TTFT p50 / p99 | TTFT short p50 / p99 | "
            "TTFT long p50 / p99 | e2e p50 / p99 | rounds |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for model in ("grouping-off", "grouping-on"):
            runs = [r for r in grouping["runs"] if r["model"] == model]
            if not runs:
                continue

            def pair(metric: str, rs: list[dict[str, Any]] = runs) -> str:
                a = _med([_p(r, metric, "p50") for r in rs])
                b = _med([_p(r, metric, "p99") for r in rs])
                return f"{a:,.0f} / {b:,.0f} ms"

            tps = _med([r["output_token_throughput"] for r in runs])
            lines.append(
                f"| {model} | {tps:,.0f} | {pair('ttft_ms')} | {pair('ttft_short_ms')} | "
                f"{pair('ttft_long_ms')} | {pair('e2e_ms')} | {len(runs)} |"
            )
        lines.append("")
    failed = {k: v for k, v in results.items() if k.endswith("_error")}
    if failed:
        lines += ["## Phases that failed", ""]
        lines += [f"- `{k[:-6]}`: `{str(v)[-400:]}`" for k, v in failed.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    results = json.loads(Path(argv[0]).read_text())
    text = render(results)
    if len(argv) > 1:
        Path(argv[1]).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
