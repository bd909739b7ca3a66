"""Alembic environment: runs migrations on the connection ``tokentrail db upgrade`` hands it.

On SQLite, foreign keys are off while migrations run: a table that others refer to can only be
changed by rebuilding it (create a copy, drop the old one, rename), and with them on, dropping the
old table fails, since its rows are still referred to. SQLite can only switch them before a
transaction starts; ``PRAGMA foreign_key_check`` then verifies every reference before the commit,
as SQLite's own procedure for changing a table does.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from tokentrail.proxy.storage.engine import make_engine


class ForeignKeyViolationError(RuntimeError):
    """A migration left rows that refer to rows that are not there (SQLite)."""


def _run(connection: Connection) -> None:
    """Run the migrations; on SQLite with foreign keys off and checked at the end (the connection is
    thrown away afterwards, by ``upgrade_database`` or below, so none is handed out with them off)."""
    sqlite = connection.dialect.name == "sqlite" and not _sqlite_in_transaction(connection)
    if sqlite:
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        # Begun here, so that the schema changes are in it too (left to the sqlite3 module, each
        # CREATE and ALTER would commit on its own): a failed migration changes nothing.
        connection.exec_driver_sql("BEGIN")
    context.configure(connection=connection, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
        if sqlite:
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
            if broken:
                table, _rowid, parent, _fk = broken[0]
                raise ForeignKeyViolationError(
                    f"{len(broken)} row(s) of {table} refer to rows of {parent} that are not there"
                )


def _sqlite_in_transaction(connection: Connection) -> bool:
    """Whether the sqlite3 module has begun a transaction (it begins one only before a write)."""
    return bool(connection.connection.dbapi_connection.in_transaction)  # type: ignore[union-attr]


def run_migrations_online() -> None:
    """Use the caller's connection when given one, else open the configured URL."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(context.config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.begin() as own_connection:
            _run(own_connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
