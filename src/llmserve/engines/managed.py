"""Managed engines: ``vllm serve`` processes that llmserve starts, watches and restarts.

Each replica is a child process on a loopback port, spoken to as an OpenAI upstream. When it
exits, it is started again after a backoff that doubles up to ``restart_backoff_max_s`` (and
starts over once a process has stayed up a minute); one that does not answer its health check
within ``startup_timeout_s`` is killed and started again. A child's crash costs the requests on
it and nothing else: the gateway and the other models carry on. Children run in their own
process group, so stopping one stops its workers too.

A managed replica is one engine process; scaling past one host is Kubernetes' job (see
docs/deploy.md), not this supervisor's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from llmserve.config import ManagedModel
from llmserve.embedded.smollm2 import ensure_embedded_model
from llmserve.engines.events import EngineEvent
from llmserve.engines.upstream.client import UpstreamEngine
from llmserve.engines.upstream.codec import EstimatingCodec
from llmserve.observability import metrics as prom
from llmserve.validation.request import ValidatedRequest

log = logging.getLogger(__name__)

# A process that ran this long was healthy: the next restart waits the shortest backoff again.
_STABLE_AFTER_S = 60.0
_STOP_GRACE_S = 10.0
# The embedded default model's settings, as for the in-process engine (loads fastest on CPU).
_EMBEDDED_ARGS = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "4096")


class ManagedServer:
    """One supervised child process serving one replica of a model."""

    def __init__(self, config: ManagedModel, index: int, cache_dir: Path) -> None:
        self._config = config
        self._index = index
        self._cache_dir = cache_dir
        self.port = config.base_port + index if config.base_port else _free_port()
        self.label = f"{config.name}-{index}"
        self._upstream = UpstreamEngine(config, f"http://127.0.0.1:{self.port}")
        self._process: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._answered = asyncio.Event()  # the current process passed a health check
        self._closing = False

    @property
    def codec(self) -> EstimatingCodec:
        return self._upstream.codec

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def log_path(self) -> Path:
        return self._cache_dir / "logs" / f"{self.label}.log"

    async def start(self) -> None:
        """Starts the supervisor and returns: the replica joins once its health check passes."""
        await self._upstream.start()
        command = await asyncio.to_thread(self._command)
        self._supervisor = asyncio.create_task(self._supervise(command))

    def generate(self, request: ValidatedRequest) -> AsyncGenerator[EngineEvent, None]:
        return self._upstream.generate(request)

    async def post_json(self, path: str, body: dict[str, Any]) -> bytes:
        return await self._upstream.post_json(path, body)

    async def abort(self, request_id: str) -> None:
        await self._upstream.abort(request_id)

    async def fetch_metrics(self) -> str:
        return await self._upstream.fetch_metrics()

    async def check_health(self) -> bool:
        if self._process is None or self._process.returncode is not None:
            return False
        healthy = await self._upstream.check_health()
        if healthy:
            self._answered.set()
        return healthy

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        await self._stop_process()
        await self._upstream.close()

    def _command(self) -> list[str]:
        c = self._config
        served = c.upstream_model or c.name
        if c.command is not None:
            model = c.model or ""
            return [part.format(port=self.port, model=model) for part in c.command]
        defaults: tuple[str, ...] = ()
        if c.model is None:  # the embedded default, prepared once and cached
            model, defaults = str(ensure_embedded_model(self._cache_dir)), _EMBEDDED_ARGS
        else:
            model = c.model
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--served-model-name",
            served,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *defaults,
            *c.args,
        ]

    async def _supervise(self, command: list[str]) -> None:
        loop = asyncio.get_running_loop()
        backoff = self._config.restart_backoff_s
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            # CPU builds of vLLM refuse to start without a KV-cache size; GPU builds ignore it.
            "VLLM_CPU_KVCACHE_SPACE": f"{self._config.cpu_kv_cache_gib:g}",
            **self._config.env,
        }
        while not self._closing:
            self._answered.clear()
            started_at = loop.time()
            with self.log_path.open("ab") as output:
                self._process = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=output,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # its own group: stopping it stops its workers
                )
            log.info(
                "model %s: replica %s started (pid %d, port %d, log %s)",
                self._config.name,
                self.label,
                self._process.pid,
                self.port,
                self.log_path,
            )
            status = await self._wait_for_exit()
            if self._closing:
                return
            ran_s = loop.time() - started_at
            if ran_s >= _STABLE_AFTER_S:
                backoff = self._config.restart_backoff_s
            log.error(
                "model %s: replica %s %s after %.0f s; restarting in %g s (its output: %s)",
                self._config.name,
                self.label,
                status,
                ran_s,
                backoff,
                self.log_path,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._config.restart_backoff_max_s)
            prom.ENGINE_RESTARTS.labels(self._config.name, self.label).inc()

    async def _wait_for_exit(self) -> str:
        """Until the process exits (or is killed for not answering in time): what happened."""
        assert self._process is not None
        exited = asyncio.ensure_future(self._process.wait())
        answered = asyncio.ensure_future(self._answered.wait())
        try:
            await asyncio.wait(
                {exited, answered},
                timeout=self._config.startup_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not exited.done() and not answered.done():
                await self._stop_process()
                return f"did not answer within {self._config.startup_timeout_s:g} s"
            code = await exited
        finally:
            answered.cancel()
            exited.cancel()
        return f"exited with status {code}"

    async def _stop_process(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(_STOP_GRACE_S):
                await process.wait()
        except TimeoutError:
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
