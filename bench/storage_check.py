"""Bytes stored per trajectory token, before and after calls were stored against earlier ones.

    python bench/storage_check.py --upstream http://127.0.0.1:8001        # a real (CPU) vLLM
    python bench/storage_check.py --upstream URL --turns 4,16,30 --conversations 8 --token-in

For each turn count, ``--conversations`` multi-turn chats (every call re-sends the whole history, as
agents do; replies of ``--max-tokens`` with ``ignore_eos``, so they have the same length on every
machine; every other one streamed) go through a ``tokentrail serve`` with its own SQLite database.
Then, on that same database:

* after: the database as this TokenTrail writes it (calls stored against earlier ones);
* before: the same database migrated down to ``0005_rl_loop``, where every call is stored whole
  (as TokenTrail wrote it until this change);
* again: migrated back up, and checked to read back exactly what was recorded.

Each size is the SQLite file after ``VACUUM``, less the file of an empty database at the same schema
(made in the same run: tables and indexes take a page each); trajectory tokens are, per trajectory, the
last call's prompt tokens plus every call's generated tokens (what a trainer needs). Also printed: where
the bytes are after (``dbstat``), and how much of them token arrays take as JSON text, against 4 bytes
a token as a binary array.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from alembic import command

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from targets import TOKENTRAIL_SERVE, free_port, tokentrail_env, wait_http  # noqa: E402

from tests.token_in_helpers import converse  # noqa: E402
from tokentrail.proxy.storage.migrate import alembic_config  # noqa: E402

WHOLE_REVISION = "0005_rl_loop"  # the last schema that stored every call whole


@dataclass
class Sizes:
    turns: int
    trajectories: int
    calls: int
    trajectory_tokens: int
    before: int
    after: int
    token_json_bytes: int
    stored_tokens: int
    reread_ok: bool
    where: str


def _file_size(path: Path) -> int:
    """The database's bytes once compacted (``VACUUM``; the WAL checkpointed into the file)."""
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.execute("VACUUM")
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def _empty_size(tmp: Path, revision: str) -> int:
    """The compacted size of a database with the schema at ``revision`` and no rows."""
    path = tmp / f"empty-{revision}.db"
    command.upgrade(alembic_config(f"sqlite:///{path}"), revision)
    return _file_size(path)


def _where(path: Path) -> str:
    """The bytes of the calls table, the completions table and all indexes, as shares of the file."""
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT CASE WHEN name IN ('llm_calls_stored', 'completions') THEN name "
            "WHEN name LIKE 'ix_%' OR name LIKE 'sqlite_autoindex_%' THEN 'indexes' ELSE 'other' END "
            "AS part, sum(pgsize) FROM dbstat GROUP BY part ORDER BY 2 DESC"
        ).fetchall()
    total = sum(size for _, size in rows) or 1
    return ", ".join(f"{part} {size / total:.0%}" for part, size in rows)


def _read_back(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT id, request, prompt_token_ids FROM llm_calls ORDER BY trajectory_id, seq"
        ).fetchall()
    return [(i, json.loads(r) if r else None, json.loads(p) if p else None) for i, r, p in rows]


def _record(upstream: str, db: Path, turns: int, conversations: int, max_tokens: int, token_in: bool) -> None:
    port = free_port()
    extra = {"TOKENTRAIL_TOKEN_IN": "true"} if token_in else {}
    env = tokentrail_env(upstream, f"sqlite:///{db}", port, db.parent, **extra)
    process = subprocess.Popen(TOKENTRAIL_SERVE, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/tokentrail/health", process)

        def one(number: int) -> None:
            with httpx.Client(timeout=300) as client:
                converse(
                    client,
                    base,
                    f"t{turns}-{number}",
                    turns=turns,
                    stream=number % 2 == 1,
                    max_tokens=max_tokens,
                    extra_body={"ignore_eos": True},
                )

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(one, range(conversations)))
    finally:
        process.send_signal(signal.SIGTERM)  # drains: every record is written before it exits
        process.wait(60)


def measure(upstream: str, turns: int, conversations: int, max_tokens: int, token_in: bool) -> Sizes:
    with tempfile.TemporaryDirectory(prefix="tokentrail-storage-") as tmp:
        db = Path(tmp) / "tokentrail.db"
        _record(upstream, db, turns, conversations, max_tokens, token_in)
        with sqlite3.connect(db) as connection:
            (calls,) = connection.execute("SELECT count(*) FROM llm_calls_stored").fetchone()
            (trajectory_tokens,) = connection.execute(
                "SELECT sum(c.prompt_tokens) + (SELECT sum(completion_tokens) FROM llm_calls_stored) "
                "FROM llm_calls_stored c WHERE c.seq = "
                "(SELECT max(seq) FROM llm_calls_stored x WHERE x.trajectory_id = c.trajectory_id)"
            ).fetchone()
            json_bytes, tokens = connection.execute(
                "SELECT sum(length(prompt_rest_ids)), sum(json_array_length(prompt_rest_ids)) "
                "FROM llm_calls_stored"
            ).fetchone()
            more_bytes, more_tokens = connection.execute(
                "SELECT sum(length(token_ids)), sum(json_array_length(token_ids)) FROM completions"
            ).fetchone()
        recorded = _read_back(db)
        after = _file_size(db) - _empty_size(Path(tmp), "head")
        where = _where(db)
        config = alembic_config(f"sqlite:///{db}")
        command.downgrade(config, WHOLE_REVISION)
        before = _file_size(db) - _empty_size(Path(tmp), WHOLE_REVISION)
        command.upgrade(config, "head")
        return Sizes(
            turns,
            conversations,
            calls,
            trajectory_tokens,
            before,
            after,
            (json_bytes or 0) + (more_bytes or 0),
            (tokens or 0) + (more_tokens or 0),
            _read_back(db) == recorded,
            where,
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstream", required=True, help="a vLLM's base URL (http://127.0.0.1:8001)")
    parser.add_argument("--turns", default="4,16,30", help="turn counts, comma-separated (default 4,16,30)")
    parser.add_argument("--conversations", type=int, default=8, help="conversations per turn count (8)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per reply (32, with ignore_eos)")
    parser.add_argument("--token-in", action="store_true", help="record with TOKENTRAIL_TOKEN_IN=true")
    args = parser.parse_args()
    os.environ.setdefault("TOKENTRAIL_LOG_LEVEL", "warning")
    mode = "token-in" if args.token_in else "default mode"
    print(
        f"| turns ({mode}) | trajectories | calls | trajectory tokens | before: bytes/token "
        "| after: bytes/token | after / before | token arrays as JSON | read back | after, by part |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for turns in (int(t) for t in args.turns.split(",")):
        s = measure(args.upstream, turns, args.conversations, args.max_tokens, args.token_in)
        per_token = s.token_json_bytes / max(1, s.stored_tokens)
        print(
            f"| {s.turns} | {s.trajectories} | {s.calls} | {s.trajectory_tokens} "
            f"| {s.before / s.trajectory_tokens:.1f} ({s.before / 1e6:.2f} MB) "
            f"| {s.after / s.trajectory_tokens:.1f} ({s.after / 1e6:.2f} MB) | {s.after / s.before:.2f} "
            f"| {per_token:.2f} bytes/token, {s.token_json_bytes / s.after:.0%} of the bytes "
            f"| {'same' if s.reread_ok else 'DIFFERENT'} | {s.where} |",
            flush=True,
        )
        if not s.reread_ok:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
