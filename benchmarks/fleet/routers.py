"""The routers the fleet benchmark puts in front of the replicas, each started by one small
launcher: given the replica URLs, a port and a scratch folder, it starts the router's process.

A router is named ``kind:policy[:key=value,...]``:

- ``llmserve:<policy>``: llmserve with ``routing.policy`` set to any value its RoutingConfig
  takes (least_outstanding, session, prefix, cache_aware, or one added later, by name), the
  options going into ``routing`` too: ``llmserve:cache_aware:load_factor=1.5``.
  ``llmserve@<git ref>:<policy>`` runs llmserve as of that commit (``git archive``, nothing in
  the checkout changes), e.g. ``llmserve@d9f2428:prefix`` (before issue 19) beside today's.
- ``sglang:<policy>``: sglang-router (``--policy cache_aware``, ``round_robin``...), options as
  its flags: ``sglang:cache_aware:cache_threshold=0.5``.
- ``vllm-router:<policy>``: vllm-project's router, the same way.

The peers live in their own virtual environments (their pins are not ours), by default under
``.cache/fleet-peers/`` (``FLEET_PEERS`` overrides):

    python3 -m venv .cache/fleet-peers/sglang
    .cache/fleet-peers/sglang/bin/pip install sglang-router
    python3 -m venv .cache/fleet-peers/vllm
    .cache/fleet-peers/vllm/bin/pip install vllm-router
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

Launcher = Callable[[Sequence[str], int, Path], subprocess.Popen[bytes]]

REPO = Path(__file__).parents[2]
PEERS = Path(os.environ.get("FLEET_PEERS", REPO / ".cache" / "fleet-peers"))
MODEL = "sim"

# The side-by-side set of the full run. A plain round robin is sglang-router's.
DEFAULT_ROUTERS = (
    "sglang:round_robin",
    "llmserve:least_outstanding",
    "llmserve@d9f2428:prefix",  # prefix as before issue 19: a hash, no load bound
    "llmserve:session",
    "llmserve:prefix",
    "llmserve:cache_aware",
    "sglang:cache_aware",
    "vllm-router:cache_aware",
    "vllm-router:consistent_hash",
)


def _value(text: str) -> object:
    try:
        return json.loads(text)  # numbers, booleans, lists
    except ValueError:
        return text


def parse_name(name: str) -> tuple[str, str, dict[str, object]]:
    """``kind:policy:k=v,k=v`` -> (kind, policy, options)."""
    kind, _, rest = name.partition(":")
    policy, _, raw = rest.partition(":")
    options = {}
    for item in filter(None, raw.split(",")):
        key, _, value = item.partition("=")
        options[key] = _value(value)
    return kind, policy, options


def _start(
    argv: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    out: IO[bytes] = log.open("wb")
    environ = {**os.environ, **(env or {})}
    return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=environ)


def source_at(ref: str) -> Path:
    """llmserve's ``src`` as of ``ref``, unpacked once under PEERS (read-only git commands)."""
    git = ["git", "-C", str(REPO)]
    sha = subprocess.run([*git, "rev-parse", ref], check=True, capture_output=True, text=True)
    dest = PEERS / f"llmserve-{sha.stdout.strip()[:12]}"
    if not (dest / "src" / "llmserve").is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            [*git, "archive", sha.stdout.strip(), "src"], check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


def llmserve(policy: str, options: dict[str, object], ref: str | None = None) -> Launcher:
    def launch(urls: Sequence[str], port: int, tmp: Path) -> subprocess.Popen[bytes]:
        model = {
            "engine": "openai",
            "name": MODEL,
            "replicas": [{"url": url} for url in urls],
            "routing": {"policy": policy, **options},
            "admission": {"max_in_flight": 4096, "max_waiting_requests": 4096},
        }
        config = {
            "log_level": "warning",
            "auth": {"enabled": False},
            "observability": {"access_log": False},
            "models": [model],
        }
        path = tmp / f"llmserve-{port}.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        argv = [sys.executable, "-m", "llmserve", "serve", "--config", str(path)]
        # An earlier commit's package ahead of the installed (editable) one on the path.
        env = {"PYTHONPATH": str(source_at(ref))} if ref else None
        return _start([*argv, "--port", str(port)], tmp / f"llmserve-{port}.log", env)

    return launch


def _flags(options: dict[str, object]) -> list[str]:
    return [part for k, v in options.items() for part in ("--" + k.replace("_", "-"), str(v))]


def sglang(policy: str, options: dict[str, object]) -> Launcher:
    def launch(urls: Sequence[str], port: int, tmp: Path) -> subprocess.Popen[bytes]:
        python = str(PEERS / "sglang" / "bin" / "python")
        argv = [python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--worker-urls", *urls, "--policy", policy]
        argv += ["--log-level", "warn", *_flags(options)]
        return _start(argv, tmp / f"sglang-{port}.log")

    return launch


def vllm_router(policy: str, options: dict[str, object]) -> Launcher:
    def launch(urls: Sequence[str], port: int, tmp: Path) -> subprocess.Popen[bytes]:
        argv = [str(PEERS / "vllm" / "bin" / "vllm-router"), "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--worker-urls", *urls, "--policy", policy]
        argv += ["--log-level", "warning", *_flags(options)]
        return _start(argv, tmp / f"vllm-router-{port}.log")

    return launch


KINDS: dict[str, Callable[[str, dict[str, object]], Launcher]] = {
    "llmserve": llmserve,
    "sglang": sglang,
    "vllm-router": vllm_router,
}


def launcher(name: str) -> Launcher:
    kind, policy, options = parse_name(name)
    if kind.startswith("llmserve@") and policy:
        return llmserve(policy, options, ref=kind.removeprefix("llmserve@"))
    if kind not in KINDS or not policy:
        raise ValueError(f"router {name!r}: expected one of {sorted(KINDS)} then :policy")
    return KINDS[kind](policy, options)
