"""``llmserve`` command line: ``serve``, ``keys`` and ``prepare-model``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llmserve.auth import cli as keys_cli
from llmserve.config import EMBEDDED_MODEL_NAME, Settings, VllmModel, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the configured models (default: embedded)")
    serve.add_argument("--config", type=Path, help="YAML configuration file")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8000)")
    serve.add_argument(
        "--no-auth",
        action="store_true",
        help="switch API keys off (the server warns loudly at start)",
    )
    prepare = commands.add_parser(
        "prepare-model",
        help="prepare the embedded models the configuration serves into the cache, then exit",
    )
    prepare.add_argument("--config", type=Path, help="YAML configuration file (for cache_dir)")
    keys_cli.add_parser(commands)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if getattr(args, "host", None):
        overrides["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    if getattr(args, "no_auth", False):
        overrides["auth"] = {"enabled": False}
    return overrides


def _prepare_models(settings: Settings) -> int:
    """Every embedded model an in-process model of the configuration names (by default the
    chat model and the embedding model), so the first ``serve`` starts without preparing."""
    from llmserve.embedded import catalog

    names = {m.embedded for m in settings.models if isinstance(m, VllmModel) and m.model is None}
    for name in sorted(names) or [EMBEDDED_MODEL_NAME]:
        print(catalog.prepare(name, settings.cache_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config, **_overrides(args))
    except (ValidationError, FileNotFoundError) as exc:
        print(f"llmserve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.command == "keys":
        return keys_cli.run(args, args.keys_file or settings.keys_path)
    if args.command == "prepare-model":
        return _prepare_models(settings)
    from llmserve.server import serve

    return serve(settings)
