"""Bring a database to the newest schema with alembic, and refuse one made by a newer TokenTrail."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from tokentrail.proxy.errors import DatabaseTooNewError
from tokentrail.proxy.storage.engine import make_engine


def alembic_config(url: str) -> Config:
    """An alembic config pointing at the migrations shipped inside the package."""
    config = Config()
    config.set_main_option("script_location", str(resources.files("tokentrail.migrations")))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision(url: str) -> str:
    """The newest revision this TokenTrail knows."""
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert head is not None
    return head


def check_not_newer(url: str, engine: Engine) -> str | None:
    """Raise ``DatabaseTooNewError`` when the database is at a revision this version does not know."""
    script = ScriptDirectory.from_config(alembic_config(url))
    revision = current_revision(engine)
    if revision is not None and revision not in {s.revision for s in script.walk_revisions()}:
        raise DatabaseTooNewError(
            f"the database is at schema revision {revision!r}, which this TokenTrail does not know: "
            "it was made by a newer version. Upgrade TokenTrail (pip install -U tokentrail) "
            "or point --db at another database."
        )
    return revision


_MIGRATION_LOCK = 0x746F6B656E  # PostgreSQL advisory lock key of TokenTrail's migrations ("token")


def upgrade_database(url: str) -> tuple[str | None, str]:
    """Migrate the database at ``url`` to the newest revision; return (before, after)."""
    engine = make_engine(url)
    try:
        before = check_not_newer(url, engine)
        config = alembic_config(url)
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # replicas started together: one migrates, the others wait here and find it done
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        return before, head_revision(url)
    finally:
        engine.dispose()


def vacuum_database(url: str) -> tuple[int, int]:
    """Rewrite the database so that the space of freed rows goes back to the file system (SQLite keeps
    freed pages, PostgreSQL dead tuples, until then); returns its size in bytes before and after.
    Takes an exclusive lock for as long as it runs: meant for a stopped TokenTrail."""
    engine = make_engine(url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            sqlite = connection.dialect.name == "sqlite"
            size = (
                "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"
                if sqlite
                else "SELECT pg_database_size(current_database())"
            )
            before = int(connection.exec_driver_sql(size).scalar_one())
            if sqlite:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            connection.exec_driver_sql("VACUUM" if sqlite else "VACUUM (FULL, ANALYZE)")
            after = int(connection.exec_driver_sql(size).scalar_one())
        return before, after
    finally:
        engine.dispose()
