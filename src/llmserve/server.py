"""Running the app under uvicorn with uvloop and httptools."""

from __future__ import annotations

import logging
import sys

import uvicorn

from llmserve.app import create_app
from llmserve.config import Settings

log = logging.getLogger(__name__)


def serve(settings: Settings) -> int:
    """Serve until stopped; returns the process exit code (1 if an engine failed to load)."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    failed = False
    server: uvicorn.Server | None = None

    def on_fatal() -> None:
        nonlocal failed
        failed = True
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        log_level=settings.log_level,
        access_log=False,
        timeout_keep_alive=30,
    )
    server = uvicorn.Server(config)
    server.run()
    return 1 if failed else 0
