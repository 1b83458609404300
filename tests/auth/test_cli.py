"""``llmserve keys create | list | revoke``: the key is printed once, and only at creation."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest

from llmserve.auth.keys import KEY_PREFIX, KeyStore, hash_key, read_keys
from llmserve.cli import main


def keys(path: Path, *args: str) -> int:
    return main(["keys", "--keys-file", str(path), *args])


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "conf" / "keys.yaml"


def create(path: Path, capsys: pytest.CaptureFixture[str], name: str, *extra: str) -> str:
    assert keys(path, "create", "--name", name, *extra) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 1, out  # the key and nothing else
    return lines[0]


def test_create_prints_the_key_once_and_stores_only_its_hash(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = create(path, capsys, "a", "--rpm", "5")
    assert key.startswith(KEY_PREFIX) and len(key) > len(KEY_PREFIX) + 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert key not in text
    assert key.removeprefix(KEY_PREFIX) not in text
    (record,) = read_keys(path).keys
    assert record.name == "a"
    assert record.hash == hash_key(key)
    assert record.rpm == 5 and record.tpm is None and record.max_concurrent is None
    assert record.models == ("*",)
    assert not record.revoked
    assert KeyStore(path).lookup(key) is not None


def test_create_stores_every_option(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = create(
        path,
        capsys,
        "b",
        "--models",
        "sim",
        "slow",
        "--tpm",
        "1000",
        "--max-concurrent",
        "3",
        "--priority",
        "2",
        "--weight",
        "0.5",
        "--expires",
        "2031-01-02T03:04:05+00:00",
    )
    (record,) = read_keys(path).keys
    assert record.models == ("sim", "slow")
    assert (record.tpm, record.max_concurrent, record.priority, record.weight) == (1000, 3, 2, 0.5)
    assert record.expires == dt.datetime(2031, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    store = KeyStore(path)
    assert store.lookup(key, dt.datetime(2031, 1, 1, tzinfo=dt.UTC)) is not None
    assert store.lookup(key, dt.datetime(2031, 1, 3, tzinfo=dt.UTC)) is None


def test_list_shows_names_and_limits_but_never_the_key(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = create(path, capsys, "first", "--rpm", "5")
    second = create(path, capsys, "second", "--models", "sim", "--tpm", "700")
    assert keys(path, "revoke", "first") == 0
    capsys.readouterr()

    assert keys(path, "list") == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("first\t") and "rpm=5" in lines[0] and "revoked" in lines[0]
    assert lines[1].startswith("second\t") and "tpm=700" in lines[1] and "models=sim" in lines[1]
    assert "active" in lines[1]
    for key in (first, second):
        assert key not in out
        assert key.removeprefix(KEY_PREFIX) not in out
        assert hash_key(key) not in out


def test_revoke_stops_the_key(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = create(path, capsys, "a")
    other = create(path, capsys, "b")
    assert keys(path, "revoke", "a") == 0
    assert "revoked 'a'" in capsys.readouterr().out
    store = KeyStore(path)
    assert store.lookup(key) is None
    assert store.lookup(other) is not None
    # Revoking again, or a name that never existed, is an error.
    assert keys(path, "revoke", "a") == 1
    assert keys(path, "revoke", "nobody") == 1
    assert "no active key named" in capsys.readouterr().out


def test_a_second_active_key_with_the_same_name_is_refused(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = create(path, capsys, "a")
    before = path.read_bytes()
    assert keys(path, "create", "--name", "a") == 1
    out = capsys.readouterr().out
    assert "exists" in out
    assert KEY_PREFIX not in out  # no key was made, so none is printed
    assert path.read_bytes() == before

    # Once revoked, the name may be reused; the old key stays dead.
    assert keys(path, "revoke", "a") == 0
    capsys.readouterr()
    replacement = create(path, capsys, "a")
    assert replacement != key
    store = KeyStore(path)
    assert store.lookup(key) is None
    found = store.lookup(replacement)
    assert found is not None and found.name == "a"


def test_the_keys_file_comes_from_the_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "from-config" / "keys.yaml"
    config = tmp_path / "llmserve.yaml"
    config.write_text(f"auth:\n  keys_file: {target}\n")
    assert main(["keys", "--config", str(config), "create", "--name", "c"]) == 0
    key = capsys.readouterr().out.strip()
    assert KeyStore(target).lookup(key) is not None


def test_invalid_names_are_refused_without_writing(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A one-line error naming the setting (no traceback); nothing is written, no key printed.
    assert keys(path, "create", "--name", "has space") == 2
    assert "name" in capsys.readouterr().err
    assert keys(path, "create", "--name", "ok", "--rpm", "0") == 2
    err = capsys.readouterr().err
    assert "rpm" in err and "Traceback" not in err
    assert not path.exists()
    assert KEY_PREFIX not in capsys.readouterr().out
