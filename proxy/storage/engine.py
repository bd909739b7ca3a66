"""Engine setup: one place that knows how TokenTrail opens its database.

SQLite gets WAL (readers never block the writer), a busy timeout, foreign keys, and a file that only
its owner can read, since prompts may hold private data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from tokentrail.proxy.jsonio import dumps_text

SQLITE_BUSY_TIMEOUT_MS = 5_000


def sqlite_path(url: str) -> Path | None:
    """The file behind a ``sqlite:///`` URL, or None for other databases and in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _create_private_file(path: Path) -> None:
    """Create the database file readable by its owner only, before SQLite creates it 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)


def _sqlite_setup(busy_timeout_ms: int) -> Any:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        _on_sqlite_connect(dbapi_connection, busy_timeout_ms)

    return on_connect


def _on_sqlite_connect(dbapi_connection: Any, busy_timeout_ms: int) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> Engine:
    """Open the database at ``url`` with the settings TokenTrail relies on (``busy_timeout_ms``: how
    long a SQLite write waits for another writer's lock before it fails)."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        _create_private_file(path)
    # Elsewhere than SQLite, a pooled connection may have died with its server (a restart, a
    # failover): check it before use, so the first batch after an outage does not fail for nothing.
    engine = create_engine(url, future=True, json_serializer=dumps_text, pool_pre_ping=path is None)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_setup(busy_timeout_ms))
    return engine
