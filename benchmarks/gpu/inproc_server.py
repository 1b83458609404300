"""`llmserve serve` exactly, plus one read-only route for the GPU smoke check:
``GET /_bench/unfinished`` → ``{model: requests vLLM still holds}`` for each in-process engine
(``VllmEngine.unfinished_requests``), so a check from outside the process can see that a client's
disconnect aborted its vLLM request. Everything else (uvicorn options, drain, engines, routes) is
``llmserve.server.serve``'s.

    PYTHONPATH=src:SITE python3 -m benchmarks.gpu.inproc_server CONFIG.yaml
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI

import llmserve.server as server
from llmserve.app import create_app as _create_app
from llmserve.config import Settings, load_settings
from llmserve.engines.vllm_engine import VllmEngine
from llmserve.registry import ModelRegistry


def create_app(
    settings: Settings,
    models: ModelRegistry | None = None,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    app = _create_app(settings, models, on_fatal)
    registry = models

    @app.get("/_bench/unfinished")
    async def unfinished() -> dict[str, Any]:
        assert registry is not None
        engines = {name: registry.get(name) for name in registry.names}
        return {
            name: engine.unfinished_requests()
            for name, engine in engines.items()
            if isinstance(engine, VllmEngine)
        }

    return app


def main() -> int:
    settings = load_settings(Path(sys.argv[1]))
    vars(server)["create_app"] = create_app  # serve() builds its app through this name
    return server.serve(settings)


if __name__ == "__main__":
    sys.exit(main())
