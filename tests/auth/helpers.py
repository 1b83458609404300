"""Shared pieces of the API-key and rate-limit tests: keys files, settings, raw HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from llmserve.auth.keys import KeyRecord, hash_key, new_key, read_keys, write_keys
from llmserve.config import AuthConfig, Limits, ModelConfig, RateLimitConfig, Settings
from tests.conftest import simulated_settings

# "sim" (fast, 256-token context) and "slow" (10 tokens/s), as in tests/conftest.py.
SIM_MODELS: list[ModelConfig] = list(simulated_settings().models)
# The simulated engine's word tokeniser counts this prompt as 2 tokens.
PROMPT = "hello there"
PROMPT_TOKENS = 2


def add_key(path: Path, name: str, **fields: Any) -> str:
    """Append a key to the keys file (as ``llmserve keys create`` does); returns the plaintext."""
    keys = read_keys(path)
    key = new_key()
    keys.keys.append(KeyRecord(name=name, hash=hash_key(key), hint=key[:16], **fields))
    write_keys(path, keys)
    return key


def revoke_key(path: Path, name: str) -> None:
    keys = read_keys(path)
    for record in keys.keys:
        if record.name == name:
            record.revoked = True
    write_keys(path, keys)


def auth_settings(
    keys_path: Path,
    *,
    models: list[ModelConfig] | None = None,
    limits: Limits | None = None,
    rate_limits: RateLimitConfig | None = None,
) -> Settings:
    """Settings with API keys ON (the suite's environment switches them off by default)."""
    return Settings(
        models=models or SIM_MODELS,
        limits=limits or Limits(),
        auth=AuthConfig(enabled=True, keys_file=keys_path, reload_interval_s=0.1),
        rate_limits=rate_limits or RateLimitConfig(),
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def completion(model: str = "sim", max_tokens: int = 1, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens}
    body.update(extra)
    return body


async def raw_http(url: str, head: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send bytes exactly as given (no client-side normalisation of the path or Host), read the
    whole response (the request must say ``Connection: close``), return status, headers, body."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"\r\n\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    header_block, _, payload = data.partition(b"\r\n\r\n")
    status_line, *lines = header_block.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, payload
