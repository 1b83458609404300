"""``llmserve`` command line: ``serve`` and ``prepare-model``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llmserve.config import load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the configured models (default: embedded)")
    serve.add_argument("--config", type=Path, help="YAML configuration file")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8000)")
    prepare = commands.add_parser(
        "prepare-model", help="prepare the embedded default model into the cache, then exit"
    )
    prepare.add_argument("--config", type=Path, help="YAML configuration file (for cache_dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if getattr(args, "host", None):
        overrides["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    try:
        settings = load_settings(args.config, **overrides)
    except (ValidationError, FileNotFoundError) as exc:
        print(f"llmserve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "prepare-model":
        from llmserve.models.embedded import ensure_embedded_model

        print(ensure_embedded_model(settings.cache_dir))
        return 0
    from llmserve.server import serve

    return serve(settings)
