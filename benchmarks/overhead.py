"""Gateway overhead, same upstream, one run: direct to a fake upstream vs through a bare aiohttp
relay, llmserve (upstream mode) and, when installed, LiteLLM's proxy (one worker).

Every process runs separately: the fake upstream (``fake_upstream.py``, pre-encoded chunks at a
fixed token rate), each gateway, and this load generator. For each concurrency and target it
reports TTFT and inter-token latency (p50/p99), throughput, and the gateway process's CPU time per
streamed token (psutil, user + system). Targets are interleaved per concurrency.

    .venv/bin/python -m benchmarks.overhead [--concurrency 16 64 256] [--litellm PATH]
        [--before GIT_REF]   # also llmserve as of an earlier commit, for before/after
        [--request completion|chat|tools|json]   # what is streamed (tools: a tool call)

LiteLLM: install it in its own environment (its pins clash with vLLM's), e.g.
``python3 -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]'``, and pass
``--litellm /tmp/litellm/bin/litellm``. Writes benchmarks/results/overhead.{md,json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import psutil

RESULTS = Path(__file__).parent / "results"
UPSTREAM_PORT, RELAY_PORT, LLMSERVE_PORT, LITELLM_PORT, BEFORE_PORT = 9301, 9302, 9303, 9304, 9305
# LiteLLM refuses to start without a master key; the other targets ignore the header.
MASTER_KEY = "sk-overhead-benchmark"


@dataclass
class Row:
    target: str
    concurrency: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    cpu_us_per_token: float | None
    errors: int


def start(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_all(
    args: argparse.Namespace, tmp: Path
) -> dict[str, tuple[str, subprocess.Popen[bytes] | None]]:
    procs: dict[str, tuple[str, subprocess.Popen[bytes] | None]] = {}
    if args.upstream:  # an upstream already running, e.g. a real `vllm serve`
        upstream = args.upstream.rstrip("/")
        procs["direct"] = (upstream, None)
    else:
        upstream = f"http://127.0.0.1:{UPSTREAM_PORT}"
        procs["direct"] = (upstream, _fake_upstream(args))
    _start_gateways(args, tmp, upstream, procs)
    return procs


def _checkout(ref: str, tmp: Path) -> Path:
    """``ref`` of this repository in a detached worktree under ``tmp`` (removed by git gc)."""
    path = tmp / "before"
    subprocess.run(
        ["git", "worktree", "add", "--detach", "--force", str(path), ref],
        check=True,
        capture_output=True,
    )
    return path


def _fake_upstream(args: argparse.Namespace) -> subprocess.Popen[bytes]:
    py = sys.executable
    return start(
        [
            py,
            "-m",
            "benchmarks.fake_upstream",
            "--port",
            str(UPSTREAM_PORT),
            "--tokens-per-second",
            str(args.tokens_per_second),
            "--ttft-ms",
            str(args.ttft_ms),
        ]
    )


def _start_gateways(
    args: argparse.Namespace,
    tmp: Path,
    upstream: str,
    procs: dict[str, tuple[str, subprocess.Popen[bytes] | None]],
) -> None:
    py = sys.executable
    relay = start(
        [py, "-m", "benchmarks.bare_relay", "--port", str(RELAY_PORT), "--upstream", upstream]
    )
    procs["bare relay"] = (f"http://127.0.0.1:{RELAY_PORT}", relay)
    config = tmp / "llmserve.yaml"
    config.write_text(
        "log_level: warning\nauth: {enabled: false}\nobservability: {access_log: false}\n"
        f"models:\n  - engine: openai\n    name: {args.model}\n    url: {upstream}\n"
        "    admission: {max_in_flight: 4096, max_waiting_requests: 4096}\n"
    )
    gateway = start(
        [py, "-m", "llmserve", "serve", "--config", str(config), "--port", str(LLMSERVE_PORT)]
    )
    procs["llmserve"] = (f"http://127.0.0.1:{LLMSERVE_PORT}", gateway)
    if args.before:
        # The same gateway from an earlier commit, same config, same run: before vs after.
        before = start(
            [py, "-m", "llmserve", "serve", "--config", str(config), "--port", str(BEFORE_PORT)],
            env={"PYTHONPATH": str(_checkout(args.before, tmp) / "src")},
        )
        procs[f"llmserve @{args.before}"] = (f"http://127.0.0.1:{BEFORE_PORT}", before)
    if args.litellm:
        lite_config = tmp / "litellm.yaml"
        lite_config.write_text(
            f"model_list:\n  - model_name: {args.model}\n    litellm_params:\n"
            f"      model: openai/{args.model}\n      api_base: {upstream}/v1\n"
            "      api_key: none\n"
        )
        lite = start(
            [
                args.litellm,
                "--config",
                str(lite_config),
                "--port",
                str(LITELLM_PORT),
                "--num_workers",
                "1",
            ],
            env={"LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": MASTER_KEY},
        )
        procs["LiteLLM proxy"] = (f"http://127.0.0.1:{LITELLM_PORT}", lite)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
# What each kind of request adds to a streamed chat request (``--request``).
REQUESTS: dict[str, dict[str, object]] = {
    "completion": {"prompt": "hello"},
    "chat": {"messages": [{"role": "user", "content": "hello"}]},
    "tools": {
        "messages": [{"role": "user", "content": "Weather in Oslo?"}],
        "tools": [WEATHER_TOOL],
        "tool_choice": "required",
    },
    "json": {
        "messages": [{"role": "user", "content": "A person, as JSON."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
        },
    },
}
REQUEST = "completion"  # set from --request


_KINDS = {
    "completion": "streaming completions",
    "chat": "streaming chat completions",
    "tools": "streaming chat completions with `tools` and `tool_choice: required` (the fake "
    "upstream streams a tool call, one piece of its arguments per token)",
    "json": "streaming chat completions with a strict `json_schema` response_format",
}


def _streamed(chunk: dict[str, object]) -> bool:
    """Whether a chunk carries a generated token: text, content, or tool-call arguments."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    choice = choices[0]
    delta = choice.get("delta") or {}
    return bool(choice.get("text") or delta.get("content") or delta.get("tool_calls"))


async def one(
    session: aiohttp.ClientSession, url: str, tokens: int, model: str = "fake"
) -> tuple[float, list[float], int]:
    body = {
        "model": model,
        **REQUESTS[REQUEST],
        "max_tokens": tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    path = "/v1/completions" if REQUEST == "completion" else "/v1/chat/completions"
    start_t = time.perf_counter()
    stamps: list[float] = []
    try:
        async with session.post(url + path, json=body) as response:
            if response.status != 200:
                await response.read()
                return 0.0, [], 1
            async for raw in response.content:
                data = raw.startswith(b"data:") and b"[DONE]" not in raw
                if data and _streamed(orjson.loads(raw[5:])):
                    stamps.append(time.perf_counter())
    except aiohttp.ClientError:  # a gateway that resets connections under load: an error
        return 0.0, [], 1
    if not stamps:
        return 0.0, [], 1
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return stamps[0] - start_t, gaps, 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def measure(
    session: aiohttp.ClientSession,
    name: str,
    url: str,
    proc: subprocess.Popen[bytes] | None,
    concurrency: int,
    tokens: int,
    rounds: int,
    model: str,
    stagger: bool = True,
) -> Row:
    watched = psutil.Process(proc.pid) if proc is not None and name != "direct" else None
    await asyncio.gather(
        *(one(session, url, 8, model) for _ in range(min(concurrency, 32)))
    )  # warm
    # Streams in a steady state are spread over a request's life, not started in lockstep:
    # stream i starts i/N of one request's duration late (measured here, one stream alone).
    # Without it every round is a burst of N arrivals in the same millisecond, and TTFT
    # measures how long a gateway takes to accept N requests at once (``--burst``).
    window_s = 0.0
    if stagger:
        ttft, gaps, _ = await one(session, url, tokens, model)
        window_s = ttft + sum(gaps)
    cpu0 = sum(watched.cpu_times()[:2]) if watched else 0.0
    started = time.perf_counter()

    async def worker(offset_s: float) -> list[tuple[float, list[float], int]]:
        # ``concurrency`` streams open at any time, each running ``rounds`` requests in turn.
        await asyncio.sleep(offset_s)
        return [await one(session, url, tokens, model) for _ in range(rounds)]

    offsets = [window_s * i / concurrency for i in range(concurrency)]
    per_worker = await asyncio.gather(*(worker(offset) for offset in offsets))
    results = [r for done in per_worker for r in done]
    elapsed = time.perf_counter() - started
    cpu1 = sum(watched.cpu_times()[:2]) if watched else 0.0
    ttfts = [r[0] for r in results if not r[2]]
    gaps = [g for r in results for g in r[1]]
    streamed = sum(len(r[1]) + 1 for r in results if not r[2])
    return Row(
        name,
        concurrency,
        streamed / elapsed,
        pct(ttfts, 0.5) * 1e3,
        pct(ttfts, 0.99) * 1e3,
        pct(gaps, 0.5) * 1e3,
        pct(gaps, 0.99) * 1e3,
        (cpu1 - cpu0) / streamed * 1e6 if watched and streamed else None,
        sum(r[2] for r in results),
    )


async def run(args: argparse.Namespace) -> list[Row]:
    tmp = Path(tempfile.mkdtemp())
    procs = start_all(args, tmp)
    rows: list[Row] = []
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {MASTER_KEY}"},
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=600),
        ) as session:
            await asyncio.sleep(3)
            for name, (url, _) in procs.items():
                await wait_up(session, url, name, args.model)
            for concurrency in args.concurrency:
                for name, (url, proc) in procs.items():
                    row = await measure(
                        session,
                        name,
                        url,
                        proc,
                        concurrency,
                        args.tokens,
                        args.rounds,
                        args.model,
                        stagger=not args.burst,
                    )
                    print(
                        f"{name:14s} c={concurrency:4d} {row.tokens_per_s:8.0f} tok/s "
                        f"TTFT p50 {row.ttft_p50_ms:7.1f} ms ITL p99 {row.itl_p99_ms:6.1f} ms "
                        f"CPU/token {row.cpu_us_per_token or 0:6.0f} us err {row.errors}",
                        flush=True,
                    )
                    rows.append(row)
    finally:
        for _, proc in procs.values():
            if proc is not None:
                proc.terminate()
        if args.before:
            cleanup = ["git", "worktree", "remove", "--force", str(tmp / "before")]
            await asyncio.to_thread(subprocess.run, cleanup, check=False)
    return rows


async def wait_up(session: aiohttp.ClientSession, url: str, name: str, model: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if (await one(session, url, 2, model))[2] == 0:
                return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(1)
    raise TimeoutError(f"{name} at {url} did not answer")


def rows_from_json(path: Path) -> list[Row]:
    return [Row(**row) for row in json.loads(path.read_text())]


def _setup(args: argparse.Namespace) -> str:
    if args.upstream:
        return f"Upstream: {args.upstream} (model {args.model}), already running. "
    return (
        f"Fake upstream at {args.tokens_per_second:g} tokens/s per stream, first token after "
        f"{args.ttft_ms:g} ms. "
    )


def report(rows: list[Row], args: argparse.Namespace) -> None:
    RESULTS.mkdir(exist_ok=True)
    lines = [
        "# Gateway overhead: same upstream, one run",
        "",
        _setup(args)
        + f"{args.tokens} output tokens per request (ignore_eos); {_KINDS[args.request]}. "
        f"Every process separate, {os.cpu_count()} CPU cores (shared by the load generator, the "
        "upstream and the gateway under test). CPU per token: the gateway process's user + "
        "system time over the streamed tokens. "
        + (
            "Every stream starts at once (`--burst`): TTFT includes accepting N requests in the "
            "same instant."
            if args.burst
            else "Streams start spread over one request's duration (a steady state of N open "
            "streams); `--burst` starts them all at once."
        ),
        "",
        "| target | streams | tok/s | ratio to direct | TTFT p50 | added TTFT p50 | TTFT p99 | "
        "ITL p50 | ITL p99 | CPU µs/token | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        direct = next(r for r in rows if r.target == "direct" and r.concurrency == row.concurrency)
        cpu = f"{row.cpu_us_per_token:.0f}" if row.cpu_us_per_token is not None else "—"
        lines.append(
            f"| {row.target} | {row.concurrency} | {row.tokens_per_s:.0f} | "
            f"{row.tokens_per_s / direct.tokens_per_s:.3f} | {row.ttft_p50_ms:.1f} ms | "
            f"{row.ttft_p50_ms - direct.ttft_p50_ms:+.1f} ms | {row.ttft_p99_ms:.1f} ms | "
            f"{row.itl_p50_ms:.1f} ms | {row.itl_p99_ms:.1f} ms | {cpu} | {row.errors} |"
        )
    lines += (
        []
        if args.upstream
        else [
            "",
            "Reading it: on 2 cores the load generator, the fake upstream and the gateway "
            "compete, so once a gateway's CPU per token times the token rate nears a core "
            "(256 streams x 50 tok/s = 12,800 tok/s), every gateway falls behind direct; compare "
            "CPU per token, which does not depend on that. LiteLLM's proxy needs a master key to "
            "start (`LITELLM_MASTER_KEY`), runs one worker, and is not otherwise tuned.",
        ]
    )
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{args.out}.json").write_text(json.dumps([vars(r) for r in rows], indent=1))
    plot(rows, args.out)
    print("\n".join(lines))


def plot(rows: list[Row], name: str = "overhead") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    targets = list(dict.fromkeys(r.target for r in rows))
    colours = dict(zip(targets, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    levels = sorted({r.concurrency for r in rows})
    for target in targets:
        mine = [r for r in rows if r.target == target]
        xs = [r.concurrency for r in mine]
        style = {"marker": "o", "label": target, "color": colours[target]}
        left.plot(xs, [r.tokens_per_s for r in mine], **style)
        if target != "direct":
            right.plot(xs, [r.cpu_us_per_token or 0 for r in mine], **style)
    left.set(
        xlabel="concurrent streams",
        ylabel="tokens/s",
        title="Throughput vs concurrency",
        xscale="log",
    )
    right.set(
        xlabel="concurrent streams",
        ylabel="µs CPU per token",
        title="Gateway CPU per token (log)",
        xscale="log",
        yscale="log",
    )
    for axis in (left, right):
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.minorticks_off()
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--burst",
        action="store_true",
        help="start every stream at once (a burst of N arrivals) instead of spread over a request",
    )
    parser.add_argument("--tokens-per-second", type=float, default=50)
    parser.add_argument("--ttft-ms", type=float, default=50)
    parser.add_argument("--litellm", help="path to LiteLLM's `litellm` command")
    parser.add_argument(
        "--upstream", help="an upstream already running (e.g. vllm serve) instead of the fake one"
    )
    parser.add_argument("--model", default="fake", help="the model name at the upstream")
    parser.add_argument("--out", default="overhead", help="report name under results/")
    parser.add_argument(
        "--before", metavar="GIT_REF", help="also run llmserve as of this commit (before/after)"
    )
    parser.add_argument(
        "--request",
        choices=sorted(REQUESTS),
        default="completion",
        help="what is streamed: completions, plain chat, chat with a required tool call (the "
        "upstream streams the call's arguments), or chat with a json_schema response_format",
    )
    args = parser.parse_args()
    global REQUEST
    REQUEST = args.request
    report(asyncio.run(run(args)), args)


if __name__ == "__main__":
    main()
