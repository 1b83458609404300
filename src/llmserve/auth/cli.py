"""``llmserve keys create | list | revoke``: manage the keys file. A new key is printed once."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from pydantic import ValidationError

from llmserve.auth.keys import KeyRecord, hash_key, new_key, read_keys, write_keys


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = commands.add_parser("keys", help="manage API keys (stored hashed in the keys file)")
    keys.add_argument("--config", type=Path, help="YAML configuration file (for auth.keys_file)")
    keys.add_argument("--keys-file", type=Path, help="the keys file (overrides the config)")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True)
    create.add_argument("--models", nargs="+", default=["*"], help="allowed models (* = all)")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute (prompt + max_tokens)")
    create.add_argument("--max-concurrent", type=int, help="requests at once")
    create.add_argument("--priority", type=int, default=0, help="queue priority, lower first")
    create.add_argument("--weight", type=float, default=1.0, help="fair-queueing weight")
    create.add_argument(
        "--expires",
        type=dt.datetime.fromisoformat,
        help="ISO date or time after which the key stops working",
    )
    actions.add_parser("list", help="list keys (names and limits, never the keys)")
    revoke = actions.add_parser("revoke", help="revoke a key by name")
    revoke.add_argument("name")


def run(args: argparse.Namespace, path: Path) -> int:
    keys = read_keys(path)
    if args.action == "list":
        for r in keys.keys:
            state = "revoked" if r.revoked else f"expires {r.expires}" if r.expires else "active"
            print(
                f"{r.name}\t{r.hint}…\tmodels={','.join(r.models)}\trpm={r.rpm}\ttpm={r.tpm}\t"
                f"max_concurrent={r.max_concurrent}\tpriority={r.priority}\t{state}"
            )
        return 0
    if args.action == "revoke":
        found = [r for r in keys.keys if r.name == args.name and not r.revoked]
        if not found:
            print(f"no active key named {args.name!r}")
            return 1
        for record in found:
            record.revoked = True
        write_keys(path, keys)
        print(f"revoked {args.name!r}; servers pick this up within seconds")
        return 0
    if any(r.name == args.name and not r.revoked for r in keys.keys):
        print(f"an active key named {args.name!r} exists; revoke it first or pick another name")
        return 1
    key = new_key()
    try:
        record = KeyRecord(
            name=args.name,
            hash=hash_key(key),
            hint=key[:16],
            models=tuple(args.models),
            rpm=args.rpm,
            tpm=args.tpm,
            max_concurrent=args.max_concurrent,
            priority=args.priority,
            weight=args.weight,
            expires=args.expires,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"llmserve keys: invalid key settings: {problems}", file=sys.stderr)
        return 2
    keys.keys.append(record)
    write_keys(path, keys)
    print(key)
    return 0
