"""API keys: generated once, stored only as SHA-256 hashes in a YAML file, looked up by hash.

SHA-256 (not a slow password hash) is right here: keys are 256-bit random tokens, so there is
nothing to brute-force, and a slow hash would cost every request. The lookup is by hash, and the
final comparison uses ``hmac.compare_digest``, so timing reveals nothing about a stored key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
import secrets
import tempfile
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-llmserve-"


class KeyRecord(BaseModel):
    """One key in the keys file. ``name`` is what logs and metrics show; never the key."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    # The first characters of the key, so an operator can tell keys apart; not a secret.
    hint: str = ""
    models: tuple[str, ...] = ("*",)
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    max_concurrent: int | None = Field(default=None, gt=0)
    priority: int = 0
    weight: float = Field(default=1.0, gt=0)
    expires: dt.datetime | None = None
    revoked: bool = False

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    def expired(self, now: dt.datetime) -> bool:
        return self.expires is not None and now >= _aware(self.expires)


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyRecord] = Field(default_factory=list)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: Path) -> KeysFile:
    if not path.exists():
        return KeysFile()
    data = yaml.safe_load(path.read_text()) or {}
    return KeysFile.model_validate(data)


def write_keys(path: Path, keys: KeysFile) -> None:
    """Atomic replace, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = keys.model_dump(mode="json", exclude_defaults=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".keys-")
    try:
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump(data, handle, sort_keys=False)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class KeyStore:
    """The keys file in memory, reloaded when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._by_hash: dict[str, KeyRecord] = {}
        self._stamp: tuple[int, ...] | None = None
        self.reload()

    def reload(self) -> bool:
        """Re-read the file if it changed; a broken file keeps the previous keys (and says so)."""
        try:
            stat = self.path.stat()
            # The inode and ctime catch atomic replaces and copies that keep the mtime.
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = (0, 0, 0, 0)
        if stamp == self._stamp:
            return False
        try:
            keys = read_keys(self.path)
        except Exception as exc:
            log.error("keys file %s is invalid, keeping the previous keys: %s", self.path, exc)
            return False
        self._by_hash = {record.hash: record for record in keys.keys}
        self._stamp = stamp
        log.info("loaded %d API key(s) from %s", len(self._by_hash), self.path)
        return True

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, presented: str, now: dt.datetime | None = None) -> KeyRecord | None:
        """The live key record for a presented key, or None (unknown, revoked or expired)."""
        digest = hash_key(presented)
        record = self._by_hash.get(digest)
        if record is None or not hmac.compare_digest(record.hash, digest):
            return None
        if record.revoked or record.expired(now or dt.datetime.now(dt.UTC)):
            return None
        return record


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
