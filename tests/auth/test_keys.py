"""API keys as stored and looked up: hashing, generation, the KeyStore and its reloads."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import os
import re
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from llmserve.auth.keys import (
    KEY_PREFIX,
    KeyRecord,
    KeysFile,
    KeyStore,
    hash_key,
    new_key,
    read_keys,
    write_keys,
)
from llmserve.auth.principal import ANONYMOUS, Principal
from tests.auth.helpers import add_key, revoke_key

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)


# --- hash_key / new_key ------------------------------------------------------------------------


def test_hash_key_is_tagged_lowercase_sha256_hex() -> None:
    key = "sk-llmserve-example"
    digest = hash_key(key)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert digest == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    assert hash_key(key) == digest  # deterministic
    assert hash_key(key + "x") != digest
    # The stored form is accepted by the keys file schema.
    assert KeyRecord(name="a", hash=digest).hash == digest


def test_new_key_has_the_prefix_and_256_random_bits() -> None:
    keys = [new_key() for _ in range(2000)]
    assert len(set(keys)) == len(keys)
    for key in keys[:50]:
        assert key.startswith(KEY_PREFIX)
        secret = key.removeprefix(KEY_PREFIX)
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", secret)
        assert len(base64.urlsafe_b64decode(secret + "=")) == 32
    # No shared structure after the prefix: every position takes many values across keys.
    secrets_ = [k.removeprefix(KEY_PREFIX) for k in keys]
    for position in range(42):  # the 43rd character carries only 4 random bits
        assert len({s[position] for s in secrets_}) > 40


# --- KeyStore.lookup ---------------------------------------------------------------------------


@pytest.fixture
def keys_path(tmp_path: Path) -> Path:
    return tmp_path / "keys.yaml"


def test_lookup_finds_a_live_key_and_only_it(keys_path: Path) -> None:
    key = add_key(keys_path, "alice", models=("sim",), rpm=5, tpm=100, max_concurrent=2)
    other = add_key(keys_path, "bob")
    store = KeyStore(keys_path)
    assert len(store) == 2
    record = store.lookup(key, NOW)
    assert record is not None and record.name == "alice"
    assert (record.rpm, record.tpm, record.max_concurrent) == (5, 100, 2)
    found_other = store.lookup(other, NOW)
    assert found_other is not None and found_other.name == "bob"
    assert store.lookup(new_key(), NOW) is None  # unknown
    assert store.lookup("", NOW) is None
    assert store.lookup(key + " ", NOW) is None
    assert store.lookup(hash_key(key), NOW) is None  # the stored hash is not a key


def test_lookup_refuses_revoked_keys(keys_path: Path) -> None:
    key = add_key(keys_path, "alice")
    revoke_key(keys_path, "alice")
    assert KeyStore(keys_path).lookup(key, NOW) is None


def test_lookup_refuses_expired_keys_from_the_expiry_instant(keys_path: Path) -> None:
    aware = add_key(keys_path, "aware", expires=NOW)
    # A naive expiry (as `--expires 2030-06-01T12:00` writes) is read as UTC.
    naive = add_key(keys_path, "naive", expires=NOW.replace(tzinfo=None))
    later = add_key(keys_path, "later", expires=NOW + dt.timedelta(days=1))
    store = KeyStore(keys_path)
    before = NOW - dt.timedelta(seconds=1)
    for key in (aware, naive, later):
        assert store.lookup(key, before) is not None
    assert store.lookup(aware, NOW) is None
    assert store.lookup(naive, NOW) is None
    assert store.lookup(later, NOW) is not None
    assert store.lookup(later, NOW + dt.timedelta(days=2)) is None
    # Without an explicit time, the real clock: a key that expired in the past is refused.
    past = add_key(keys_path, "past", expires=dt.datetime(2001, 1, 1, tzinfo=dt.UTC))
    store.reload()
    assert store.lookup(past) is None
    assert store.lookup(later) is not None  # 2030 is in the future for a while yet


def test_missing_keys_file_means_no_keys(keys_path: Path) -> None:
    store = KeyStore(keys_path)
    assert len(store) == 0
    assert store.lookup(new_key(), NOW) is None


# --- reloads -----------------------------------------------------------------------------------


def test_reload_picks_up_created_and_revoked_keys(keys_path: Path) -> None:
    first = add_key(keys_path, "first")
    store = KeyStore(keys_path)
    assert store.reload() is False  # unchanged file: nothing to do

    second = add_key(keys_path, "second")
    assert store.lookup(second, NOW) is None  # not before a reload
    assert store.reload() is True
    assert store.lookup(second, NOW) is not None
    assert store.lookup(first, NOW) is not None

    revoke_key(keys_path, "first")
    assert store.reload() is True
    assert store.lookup(first, NOW) is None
    assert store.lookup(second, NOW) is not None


def test_deleting_the_keys_file_removes_every_key(keys_path: Path) -> None:
    key = add_key(keys_path, "alice")
    store = KeyStore(keys_path)
    keys_path.unlink()
    assert store.reload() is True
    assert store.lookup(key, NOW) is None


@pytest.mark.parametrize(
    "broken",
    [
        "keys: [\n  - name: x\n",  # YAML syntax error (truncated)
        "keys:\n  - name: x\n    hash: md5:abc\n",  # schema: bad hash
        "keys:\n  - name: x\n    hash: sha256:" + "0" * 64 + "\n    colour: red\n",  # unknown field
        "- just a list\n",  # wrong shape
    ],
)
def test_a_broken_keys_file_keeps_the_previous_keys(
    keys_path: Path, broken: str, caplog: pytest.LogCaptureFixture
) -> None:
    key = add_key(keys_path, "alice")
    store = KeyStore(keys_path)
    keys_path.write_text(broken)
    with caplog.at_level(logging.ERROR, logger="llmserve.auth.keys"):
        assert store.reload() is False
    assert store.lookup(key, NOW) is not None
    assert len(store) == 1
    assert any("keeping the previous keys" in r.getMessage() for r in caplog.records)
    # Once the file is fixed, the reload applies it.
    newer = add_key(keys_path.with_name("fixed.yaml"), "bob")
    os.replace(keys_path.with_name("fixed.yaml"), keys_path)
    assert store.reload() is True
    assert store.lookup(newer, NOW) is not None
    assert store.lookup(key, NOW) is None


# --- the file ----------------------------------------------------------------------------------


def test_write_keys_makes_an_owner_only_file_without_plaintext_keys(keys_path: Path) -> None:
    keys_path.write_text("keys: []\n")
    keys_path.chmod(0o644)  # a file someone made world-readable is replaced, not reused
    plaintexts = [add_key(keys_path, f"k{i}", rpm=i + 1) for i in range(3)]
    assert stat.S_IMODE(keys_path.stat().st_mode) == 0o600
    text = keys_path.read_text()
    for key in plaintexts:
        assert key not in text
        assert key.removeprefix(KEY_PREFIX) not in text
        assert hash_key(key) in text
    # Atomic replace: no temporary file is left next to it.
    assert [p.name for p in keys_path.parent.iterdir()] == [keys_path.name]
    # And it reads back to the same records.
    assert [r.name for r in read_keys(keys_path).keys] == ["k0", "k1", "k2"]


def test_write_keys_round_trips_every_field(keys_path: Path) -> None:
    record = KeyRecord(
        name="full",
        hash=hash_key("x"),
        hint="sk-llmserve-abcd",
        models=("sim", "slow"),
        rpm=1,
        tpm=2,
        max_concurrent=3,
        priority=4,
        weight=0.5,
        expires=NOW,
        revoked=True,
    )
    write_keys(keys_path, KeysFile(keys=[record]))
    assert read_keys(keys_path).keys == [record]


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "has space"},
        {"name": ""},
        {"hash": "sha256:" + "A" * 64},
        {"rpm": 0},
        {"tpm": -1},
        {"max_concurrent": 0},
        {"weight": 0},
    ],
)
def test_key_records_reject_invalid_fields(fields: dict[str, object]) -> None:
    values: dict[str, object] = {"name": "ok", "hash": hash_key("x"), **fields}
    with pytest.raises(ValidationError):
        KeyRecord.model_validate(values)


# --- the principal -----------------------------------------------------------------------------


def test_principal_from_key_carries_limits_and_model_access() -> None:
    record = KeyRecord(
        name="p",
        hash=hash_key("x"),
        models=("sim",),
        rpm=3,
        tpm=30,
        max_concurrent=1,
        priority=2,
        weight=0.25,
    )
    principal = Principal.from_key(record)
    assert principal == Principal("p", ("sim",), 3, 30, 1, 0.25, 2)
    assert principal.allows("sim") and not principal.allows("slow")
    assert principal.limited
    unlimited = Principal.from_key(KeyRecord(name="u", hash=hash_key("y")))
    assert unlimited.allows("anything") and not unlimited.limited
    assert ANONYMOUS.allows("sim") and not ANONYMOUS.limited
