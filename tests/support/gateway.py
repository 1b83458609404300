"""Starting a gateway for a test: in this event loop (``serve``: the real app under uvicorn on a
loopback port), or as its own process (``gateway_process``: ``python -m llmserve serve``) for what
only a process shows: its RSS, its logs, its signals and exit status.

API keys are off unless a test turns them on: ``serve`` switches them off for settings that do
not name their ``auth`` (tests/auth names it, with its own keys file), and a process is
configured by its file alone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from llmserve.app import create_app
from llmserve.config import AuthConfig, Settings
from llmserve.registry import ModelRegistry
from llmserve.server import uvicorn_config
from tests.support.eventually import eventually

Ready = Callable[[], Awaitable[bool]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# In this event loop
# ---------------------------------------------------------------------------------------------


@dataclass
class RunningServer:
    url: str
    settings: Settings
    models: ModelRegistry

    def engine(self, name: str) -> Any:
        return self.models.get(name)


def keys_off_unless_named(settings: Settings) -> Settings:
    """``settings`` with API keys off, unless they were built with an ``auth`` of their own."""
    if "auth" in settings.model_fields_set:
        return settings
    return settings.model_copy(update={"auth": AuthConfig(enabled=False)})


@asynccontextmanager
async def serve(settings: Settings, port: int | None = None) -> AsyncIterator[RunningServer]:
    """Run the real app under uvicorn (httptools) in this event loop, on a loopback port: a
    free one, or ``port`` (a server that comes back where it was)."""
    settings = keys_off_unless_named(settings)
    registry = ModelRegistry.from_config(settings.models, settings.cache_dir)
    app = create_app(settings, registry)
    port = port or free_port()
    config = uvicorn_config(app, "127.0.0.1", port, "warning", settings.limits)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started or task.done(), 30.0, "uvicorn to start")
    if task.done():
        task.result()  # it failed to start: say why
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", settings, registry)
    finally:
        server.should_exit = True
        await task


# ---------------------------------------------------------------------------------------------
# In a process of its own
# ---------------------------------------------------------------------------------------------


class ServerProcess:
    """A server in its own process listening at ``url``, its stdout and stderr in ``log``.

    ``start`` waits until a readiness condition holds (a path answering 200, or any async
    condition), failing with the log's tail if the process exits first; ``stop`` sends SIGTERM
    and fails, after a SIGKILL, if the process outlives ``within_s``: a server must stop on it.
    An async context manager: started on entry, stopped on exit."""

    def __init__(
        self, command: Sequence[str], url: str, log: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.command = tuple(command)
        self.url = url
        self.log = log
        self.env = dict(os.environ if env is None else env)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self._process is not None, "not started"
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """None while it runs; then its exit status (-N: killed by signal N)."""
        return self.process.poll()

    def spawn(self) -> None:
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )

    async def start(self, ready: str | Ready = "/ready", within_s: float = 30.0) -> ServerProcess:
        """Spawn it and wait until ``ready`` holds: GET of that path answers 200, or the
        condition returns True."""
        self.spawn()
        return await self.wait_ready(ready, within_s)

    async def wait_ready(
        self, ready: str | Ready = "/ready", within_s: float = 30.0
    ) -> ServerProcess:
        """Wait (after ``spawn``) until ``ready`` holds, as ``start`` does."""
        async with httpx.AsyncClient(base_url=self.url, timeout=1) as client:

            async def answers() -> bool:
                assert isinstance(ready, str)
                try:
                    return (await client.get(ready)).status_code == 200
                except httpx.TransportError:
                    return False

            condition = answers if isinstance(ready, str) else ready

            async def is_ready() -> bool:
                if self.returncode is not None:
                    raise AssertionError(f"exited with {self.returncode}: {self.log_text(4000)}")
                return await condition()

            await eventually(is_ready, within_s, f"{self.url} ready ({ready})", interval=0.05)
        return self

    def send_signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    async def wait(self, within_s: float) -> int:
        """Its exit status, once it has exited (an AssertionError after ``within_s``)."""
        await eventually(lambda: self.returncode is not None, within_s, f"{self.url} to exit")
        return self.process.returncode

    async def stop(self, within_s: float = 20.0, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and return its exit status (at once if it already exited)."""
        if self._process is None:
            return 0
        if self.returncode is None:
            self.send_signal(sig)
            try:
                return await self.wait(within_s)
            except AssertionError:
                self.process.kill()
                await self.wait(10.0)
                name = signal.Signals(sig).name
                raise AssertionError(
                    f"{self.command[0]} did not stop on {name} in {within_s} s: "
                    f"{self.log_text(4000)}"
                ) from None
        return self.process.returncode

    def log_text(self, tail: int | None = None) -> str:
        """Its output so far (the last ``tail`` characters of it)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text if tail is None else text[-tail:]

    def rss_bytes(self) -> int:
        """Resident set size, from /proc (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")

    def rss_mib(self) -> float:
        return self.rss_bytes() / 2**20

    async def __aenter__(self) -> ServerProcess:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()


def gateway_process(
    config: Path,
    text: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
) -> ServerProcess:
    """``python -m llmserve serve --config FILE`` on a free loopback port, not started yet;
    ``text``, when given, is written to the file first. The file alone configures it: the
    caller's LLMSERVE_* variables are not passed on; ``env`` adds to what is. Its output goes
    to ``log`` (by default the file's name with .log)."""
    if text is not None:
        config.write_text(text)
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVE_")}
    command = [sys.executable, "-m", "llmserve", "serve", "--config", str(config)]
    return ServerProcess(
        [*command, "--port", str(port)],
        f"http://127.0.0.1:{port}",
        log or config.with_suffix(".log"),
        {**environment, **(env or {})},
    )
