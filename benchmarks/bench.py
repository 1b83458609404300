"""Load generator over the OpenAI API (streaming): TTFT, inter-token latency (ITL), time per output
token (TPOT), end-to-end latency (p50/p90/p99), request and output-token throughput, and goodput
under SLOs, at fixed concurrency (closed loop) and at fixed arrival rates (open loop, Poisson).

    .venv/bin/python -m benchmarks.bench --url http://127.0.0.1:8000 --model M \\
        --concurrency 1 8 32 --rate 2 5 10 --duration-s 30 --workload mixed \\
        --out benchmarks/results/bench-NAME

Closed loop: ``c`` clients, each sends its next request when the previous one ends (``--requests``
per level, default max(16, 4c)). Open loop: requests are sent at Poisson arrival times (seeded)
for ``--duration-s`` seconds (at most ``--requests``), whether or not earlier ones finished.
Workloads: ``fixed`` (the given sizes), ``random`` (each size uniform in [0.5x, 1.5x]), ``mixed``
(half ~32 prompt tokens/64 out, half ~1024/128, shuffled). Prompts are repeated words, about one
token each, led by the request's number so that no two share a prefix; requests ask for
``max_tokens`` with ``"ignore_eos": true``.

TTFT: send to the first chunk with text. ITL: gaps between chunks with text. TPOT: (e2e - TTFT) /
(tokens - 1), tokens from the usage chunk (``stream_options.include_usage``) or else counted
chunks. Goodput: completed requests per second with TTFT <= --slo-ttft-ms and TPOT <=
--slo-tpot-ms. Errors are counted by HTTP status, or by failure where there is none ("dropped",
"stream", "connection", "timeout", "protocol"); they never stop the run.

Writes OUT/bench.json (config, summaries, per-request records), OUT/bench.md (tables) and
OUT/latency.png, OUT/throughput.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
from tqdm import tqdm

from benchmarks.loadgen import (
    Endpoint,
    Job,
    LoadRun,
    Result,
    run_closed_loop,
    run_open_loop,
    wait_ready,
)

Workload = Literal["fixed", "random", "mixed"]
Mode = Literal["concurrency", "rate"]
RESULTS = Path(__file__).parent / "results"
# Common English words, one token each (with their leading space) in the usual BPE vocabularies.
_SENTENCE = (
    "the quick brown fox jumps over a lazy dog while the old man reads his book in the "
    "small house by the river and the children play near the green field under blue sky"
)
WORDS = tuple(_SENTENCE.split())
MIXED_SHORT = (32, 64)  # prompt tokens, output tokens
MIXED_LONG = (1024, 128)
PERCENTILES = (50, 90, 99)


# ---------------------------------------------------------------------------------- workloads


def build_prompt(tokens: int, index: int = 0) -> str:
    """About ``tokens`` tokens: the request's number, then repeated common words."""
    words = [str(index)] + [WORDS[(index + i) % len(WORDS)] for i in range(max(0, tokens - 1))]
    return " ".join(words)


def make_jobs(
    workload: Workload, n: int, prompt_tokens: int, output_tokens: int, seed: int = 0
) -> list[Job]:
    """``n`` jobs; the same arguments give the same jobs."""
    rng = random.Random(seed)
    if workload == "fixed":
        sizes = [(prompt_tokens, output_tokens)] * n
    elif workload == "random":

        def around(x: int) -> int:
            return max(1, rng.randint(math.ceil(0.5 * x), math.floor(1.5 * x)))

        sizes = [(around(prompt_tokens), around(output_tokens)) for _ in range(n)]
    elif workload == "mixed":
        sizes = [MIXED_SHORT] * (n // 2) + [MIXED_LONG] * (n - n // 2)
        rng.shuffle(sizes)
    else:
        raise ValueError(f"unknown workload {workload!r}")
    return [
        Job(build_prompt(p, i), max_tokens=o, prompt_tokens=p) for i, (p, o) in enumerate(sizes)
    ]


def poisson_arrivals(
    rate: float, duration_s: float, seed: int = 0, limit: int | None = None
) -> list[float]:
    """Send times (s from the start) of a Poisson process at ``rate``/s, within ``duration_s``:
    exponential gaps of mean 1/rate from a seeded RNG, so a seed gives one exact schedule."""
    rng = random.Random(seed)
    times: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s and (limit is None or len(times) < limit):
        times.append(t)
        t += rng.expovariate(rate)
    return times


# ---------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Slo:
    ttft_ms: float | None = 500.0
    tpot_ms: float | None = 50.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def distribution(values_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99 and mean, in milliseconds."""
    out: dict[str, float | None] = {}
    for q in PERCENTILES:
        v = percentile(values_s, q)
        out[f"p{q}"] = None if v is None else v * 1e3
    out["mean"] = statistics.fmean(values_s) * 1e3 if values_s else None
    return out


def meets_slo(result: Result, slo: Slo) -> bool:
    """Completed, TTFT within its SLO and TPOT within its SLO (a one-token answer has no TPOT)."""
    if not result.ok:
        return False
    if slo.ttft_ms is not None and result.ttft_s * 1e3 > slo.ttft_ms:
        return False
    tpot = result.tpot_s
    return slo.tpot_ms is None or tpot is None or tpot * 1e3 <= slo.tpot_ms


def goodput(results: Sequence[Result], seconds: float, slo: Slo) -> float:
    """Requests per second that completed within every SLO."""
    return sum(meets_slo(r, slo) for r in results) / seconds if seconds > 0 else 0.0


def peak_in_flight(results: Sequence[Result]) -> int:
    edges = sorted(
        [(r.start_s, 1) for r in results] + [(r.start_s + r.e2e_s, -1) for r in results],
        key=lambda e: (e[0], e[1]),
    )
    peak = level = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


def summarize(run: LoadRun, mode: Mode, load: float, slo: Slo) -> dict[str, Any]:
    ok = run.ok
    seconds = run.seconds
    errors = Counter(r.error_key for r in run.results if not r.ok)
    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    summary: dict[str, Any] = {
        "mode": mode,
        "load": load,
        "requests": len(run.results),
        "completed": len(ok),
        "errors": dict(sorted(errors.items())),
        "seconds": seconds,
        "request_throughput": len(ok) / seconds if seconds else 0.0,
        "output_token_throughput": sum(r.tokens for r in ok) / seconds if seconds else 0.0,
        "input_token_throughput": (
            sum(r.prompt_tokens or 0 for r in ok) / seconds if seconds else 0.0
        ),
        "goodput": goodput(run.results, seconds, slo),
        "slo_attainment": (
            sum(meets_slo(r, slo) for r in run.results) / len(run.results) if run.results else 0.0
        ),
        "output_tokens_mean": statistics.fmean(r.tokens for r in ok) if ok else None,
        "ttft_ms": distribution([r.ttft_s for r in ok]),
        "itl_ms": distribution([g for r in ok for g in r.itl_s]),
        "tpot_ms": distribution(tpots),
        "e2e_ms": distribution([r.e2e_s for r in ok]),
        "peak_in_flight": peak_in_flight(run.results),
    }
    if mode == "rate":
        due = sorted(r.scheduled_s or 0.0 for r in run.results)
        lags = [r.start_s - (r.scheduled_s or 0.0) for r in run.results]
        summary["offered_rate"] = load
        summary["mean_gap_s"] = due[-1] / len(due) if due else None
        summary["launch_lag_ms"] = distribution(lags)
    return summary


# ---------------------------------------------------------------------------------- running


@dataclass
class BenchConfig:
    url: str
    model: str
    api_key: str | None = None
    endpoint: Endpoint = "completions"
    concurrency: list[int] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    duration_s: float = 30.0
    requests: int | None = None
    workload: Workload = "fixed"
    prompt_tokens: int = 128
    output_tokens: int = 64
    slo_ttft_ms: float | None = 500.0
    slo_tpot_ms: float | None = 50.0
    seed: int = 0
    progress: bool = True
    timeout_s: float = 600.0
    ready_timeout_s: float = 60.0  # wait for GET /v1/models; 0 skips the wait
    note: str = ""  # the setup under test, in words, for the report

    @property
    def slo(self) -> Slo:
        return Slo(self.slo_ttft_ms, self.slo_tpot_ms)


@dataclass
class Level:
    mode: Mode
    load: float
    run: LoadRun
    summary: dict[str, Any]


def closed_loop_requests(config: BenchConfig, concurrency: int) -> int:
    return config.requests if config.requests is not None else max(16, 4 * concurrency)


async def run_level(
    session: aiohttp.ClientSession, config: BenchConfig, mode: Mode, load: float
) -> Level:
    url = config.url.rstrip("/")
    if mode == "concurrency":
        n = closed_loop_requests(config, int(load))
        arrivals: list[float] = []
        label = f"concurrency {int(load)}"
    else:
        arrivals = poisson_arrivals(load, config.duration_s, config.seed, config.requests)
        n = len(arrivals)
        label = f"rate {load:g}/s"
    jobs = make_jobs(config.workload, n, config.prompt_tokens, config.output_tokens, config.seed)
    errors = 0
    with tqdm(total=n, desc=label, unit="req", disable=not config.progress, file=sys.stderr) as bar:

        def done(result: Result) -> None:
            nonlocal errors
            errors += not result.ok
            bar.update()
            if errors:
                bar.set_postfix(errors=errors, refresh=False)

        if mode == "concurrency":
            run = await run_closed_loop(
                session,
                label,
                url,
                config.model,
                jobs,
                int(load),
                endpoint=config.endpoint,
                on_done=done,
            )
        else:
            run = await run_open_loop(
                session,
                label,
                url,
                config.model,
                jobs,
                arrivals,
                rate=load,
                endpoint=config.endpoint,
                on_done=done,
            )
    run.results.sort(key=lambda r: r.start_s)
    return Level(mode, load, run, summarize(run, mode, load, config.slo))


async def run_benchmark(config: BenchConfig) -> list[Level]:
    """Every concurrency level, then every rate, one after the other."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    levels: list[Level] = []
    async with aiohttp.ClientSession(
        headers=headers,
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=config.timeout_s),
    ) as session:
        if config.ready_timeout_s > 0:
            await wait_ready(session, config.url.rstrip("/"), "/v1/models", config.ready_timeout_s)
        loads: list[tuple[Mode, float]] = [("concurrency", c) for c in config.concurrency]
        loads += [("rate", r) for r in config.rate]
        for mode, load in loads:
            level = await run_level(session, config, mode, load)
            if config.progress:
                print(one_line(level.summary), file=sys.stderr, flush=True)
            levels.append(level)
    return levels


# ---------------------------------------------------------------------------------- reporting


def _ms(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _dist(d: dict[str, float | None]) -> str:
    return " / ".join(_ms(d[f"p{q}"]) for q in PERCENTILES)


def load_label(summary: dict[str, Any]) -> str:
    if summary["mode"] == "concurrency":
        clients = int(summary["load"])
        return f"{clients} client" + ("s" if clients != 1 else "")
    return f"{summary['load']:g} req/s"


def one_line(s: dict[str, Any]) -> str:
    return (
        f"{load_label(s):>12s}: {s['request_throughput']:6.2f} req/s "
        f"{s['output_token_throughput']:8.1f} tok/s goodput {s['goodput']:6.2f} req/s  "
        f"TTFT p50 {_ms(s['ttft_ms']['p50'])} ms  ITL p50 {_ms(s['itl_ms']['p50'], 2)} ms  "
        f"TPOT p50 {_ms(s['tpot_ms']['p50'], 2)} ms  errors {sum(s['errors'].values())}"
    )


def record(result: Result) -> dict[str, Any]:
    job = result.job
    tpot = result.tpot_s
    return {
        "start_s": round(result.start_s, 6),
        "scheduled_s": None if result.scheduled_s is None else round(result.scheduled_s, 6),
        "status": result.status,
        "error": result.error_key,
        "detail": result.detail or None,
        "target_prompt_tokens": job.prompt_tokens if job else None,
        "prompt_tokens": result.prompt_tokens,
        "max_tokens": job.max_tokens if job else None,
        "output_tokens": result.tokens,
        "ttft_ms": round(result.ttft_s * 1e3, 3) if result.ok else None,
        "tpot_ms": None if tpot is None else round(tpot * 1e3, 3),
        "e2e_ms": round(result.e2e_s * 1e3, 3),
        "itl_ms": [round(g * 1e3, 3) for g in result.itl_s],
    }


def markdown(config: BenchConfig, levels: Sequence[Level]) -> str:
    slo = config.slo
    slo_text = ", ".join(
        part
        for part in (
            f"TTFT ≤ {slo.ttft_ms:g} ms" if slo.ttft_ms is not None else "",
            f"TPOT ≤ {slo.tpot_ms:g} ms" if slo.tpot_ms is not None else "",
        )
        if part
    )
    sizes = {
        "fixed": f"{config.prompt_tokens} prompt tokens, {config.output_tokens} output tokens",
        "random": f"prompt and output tokens uniform in [0.5x, 1.5x] of {config.prompt_tokens} "
        f"and {config.output_tokens}",
        "mixed": f"half ~{MIXED_SHORT[0]} prompt / {MIXED_SHORT[1]} output tokens, half "
        f"~{MIXED_LONG[0]} / {MIXED_LONG[1]}, shuffled",
    }[config.workload]
    lines = [
        f"# Load test: {config.model}",
        "",
        f"`{config.url}`, streaming {config.endpoint}, workload **{config.workload}** ({sizes}, "
        f"ignore_eos), seed {config.seed}. Goodput SLO: {slo_text or 'none'}. Load generator on "
        f"{os.cpu_count()} CPU cores ({platform.machine()}, Python {platform.python_version()}), "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}. Latencies in ms as p50 / p90 / p99.",
    ]
    if config.note:
        lines += ["", config.note]
    for mode, title in (("concurrency", "Closed loop"), ("rate", "Open loop (Poisson)")):
        mine = [lv.summary for lv in levels if lv.mode == mode]
        if not mine:
            continue
        extra = "" if mode == "concurrency" else f", {config.duration_s:g} s of arrivals"
        lines += [
            "",
            f"## {title}{extra}",
            "",
            "| load | requests | errors | req/s | output tok/s | goodput req/s | TTFT | ITL | "
            "TPOT | E2E | peak in flight |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in mine:
            errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "0"
            lines.append(
                f"| {load_label(s)} | {s['requests']} | {errors} | "
                f"{s['request_throughput']:.2f} | {s['output_token_throughput']:.1f} | "
                f"{s['goodput']:.2f} ({s['slo_attainment']:.0%}) | {_dist(s['ttft_ms'])} | "
                f"{_dist(s['itl_ms'])} | {_dist(s['tpot_ms'])} | {_dist(s['e2e_ms'])} | "
                f"{s['peak_in_flight']} |"
            )
        if mode == "rate":
            lines.append("")
            for s in mine:
                lines.append(
                    f"- {load_label(s)}: {s['requests']} arrivals (seed {config.seed}), mean gap "
                    f"{_ms((s['mean_gap_s'] or 0) * 1e3)} ms; sent behind schedule by "
                    f"{_dist(s['launch_lag_ms'])} ms (p50 / p90 / p99)."
                )
    lines += [
        "",
        "TTFT: send to first text chunk. ITL: gaps between text chunks. TPOT: (e2e - TTFT) / "
        "(output tokens - 1). Goodput: completed requests per second within every SLO (in "
        "brackets, the share of all requests that were). Throughput: completed work over the "
        "level's wall time (open loop: from the start of the schedule to the last completion).",
        "",
    ]
    return "\n".join(lines)


def plot(levels: Sequence[Level], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("concurrency", "rate") if any(lv.mode == m for lv in levels)]
    if not modes:
        return []
    xlabels = {"concurrency": "concurrent clients", "rate": "arrival rate (req/s)"}
    metrics = (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E"))
    paths = [out / "latency.png", out / "throughput.png"]

    def x_axis(axis: Any, xs: list[float]) -> None:
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 8:
            axis.set_xscale("log")
        axis.set_xticks(xs, [f"{x:g}" for x in xs])
        axis.minorticks_off()

    fig, axes = plt.subplots(len(modes), 4, figsize=(16, 3.6 * len(modes)), squeeze=False)
    for row, mode in zip(axes, modes, strict=True):
        mine = [lv.summary for lv in levels if lv.mode == mode]
        xs = [s["load"] for s in mine]
        for axis, (key, name) in zip(row, metrics, strict=True):
            for q in PERCENTILES:
                ys = [s[key][f"p{q}"] for s in mine]
                axis.plot(xs, [math.nan if y is None else y for y in ys], marker="o", label=f"p{q}")
            axis.set(xlabel=xlabels[mode], ylabel="ms", title=f"{name} vs {mode}")
            x_axis(axis, xs)
            axis.set_ylim(bottom=0)
            axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.8 * len(modes)), squeeze=False)
    for (tokens, requests), mode in zip(axes, modes, strict=True):
        mine = [lv.summary for lv in levels if lv.mode == mode]
        xs = [s["load"] for s in mine]
        tokens.plot(xs, [s["output_token_throughput"] for s in mine], "o-", label="output tok/s")
        tokens.set(xlabel=xlabels[mode], ylabel="tokens/s", title=f"Token throughput vs {mode}")
        requests.plot(xs, [s["request_throughput"] for s in mine], "s-", label="completed")
        requests.plot(xs, [s["goodput"] for s in mine], "^--", label="goodput (within SLOs)")
        if mode == "rate":
            requests.plot(xs, xs, ":", color="grey", label="offered")
        requests.set(
            xlabel=xlabels[mode], ylabel="requests/s", title=f"Request throughput vs {mode}"
        )
        for axis in (tokens, requests):
            x_axis(axis, xs)
            axis.set_ylim(bottom=0)
            axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def write_report(
    config: BenchConfig, levels: Sequence[Level], out: Path, plots: bool = True
) -> list[Path]:
    """OUT/bench.json, OUT/bench.md and (``plots``) OUT/latency.png, OUT/throughput.png."""
    out.mkdir(parents=True, exist_ok=True)
    head = {
        "config": {k: v for k, v in asdict(config).items() if k != "api_key"},
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    def dump(value: Any, indent: int | None = None) -> str:
        return json.dumps(value, indent=indent, allow_nan=False)

    # Indented, except that each per-request record is one line.
    parts = [dump(head, 1)[:-2] + ',\n "levels": [\n']
    for i, lv in enumerate(levels):
        records = ",\n    ".join(dump(record(r)) for r in lv.run.results)
        summary = dump(lv.summary, 1).replace("\n", "\n   ")
        comma = "," if i < len(levels) - 1 else ""
        parts.append(f'  {{"summary": {summary},\n   "records": [\n    {records}\n  ]}}{comma}\n')
    parts.append(" ]\n}\n")
    paths = [out / "bench.json", out / "bench.md"]
    paths[0].write_text("".join(parts))
    paths[1].write_text(markdown(config, levels))
    if plots:
        paths += plot(levels, out)
    return paths


# ---------------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://host:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key", default=os.environ.get("LLMSERVE_API_KEY"))
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[], metavar="C")
    parser.add_argument("--rate", type=float, nargs="+", default=[], metavar="R")
    parser.add_argument("--duration-s", type=float, default=30.0, help="open loop: arrivals for")
    parser.add_argument("--requests", type=int, help="per level (open loop: at most)")
    parser.add_argument("--workload", choices=("fixed", "random", "mixed"), default="fixed")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--slo-ttft-ms", type=float, default=500.0, help="0 for none")
    parser.add_argument("--slo-tpot-ms", type=float, default=50.0, help="0 for none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    parser.add_argument("--ready-timeout-s", type=float, default=60.0, help="0 skips the wait")
    parser.add_argument("--out", type=Path, help="folder (default benchmarks/results/bench-MODEL)")
    parser.add_argument("--note", default="", help="the setup under test, for the report")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not args.concurrency and not args.rate:
        parser.error("give --concurrency and/or --rate")
    if any(c < 1 for c in args.concurrency) or any(r <= 0 for r in args.rate):
        parser.error("concurrency levels and rates must be positive")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be positive")
    config = BenchConfig(
        url=args.url,
        model=args.model,
        api_key=args.api_key,
        endpoint=args.endpoint,
        concurrency=args.concurrency,
        rate=args.rate,
        duration_s=args.duration_s,
        requests=args.requests,
        workload=args.workload,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        slo_ttft_ms=args.slo_ttft_ms or None,
        slo_tpot_ms=args.slo_tpot_ms or None,
        seed=args.seed,
        progress=not args.no_progress,
        timeout_s=args.timeout_s,
        ready_timeout_s=args.ready_timeout_s,
        note=args.note,
    )
    return config, args.out or RESULTS / f"bench-{args.model.replace('/', '_')}"


def main(argv: Sequence[str] | None = None) -> None:
    config, out = parse_args(argv)
    levels = asyncio.run(run_benchmark(config))
    paths = write_report(config, levels, out)
    print(markdown(config, levels))
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
