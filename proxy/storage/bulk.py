"""Many-row INSERTs that hand the driver ready-made tuples.

Why: SQLAlchemy's executemany runs each value of each row through its type's bind processor (three
timestamps and four JSON columns per call). Measured on SQLite, that per-value work was most of the
writer thread's time (about 60% of ~90 us per record), and the writer thread shares the GIL with the
event loop. Here each value is made once, in exactly the form SQLAlchemy's types would have stored
(UTC timestamps as SQLite's text form or aware datetimes for PostgreSQL, JSON as text, ``None`` in a
JSON column as JSON ``null``), so rows read back through the ORM are the same either way.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table

from tokentrail.proxy.jsonio import dumps_text


class RowEncoder:
    """Values and INSERT statements for one database dialect."""

    def __init__(self, dialect_name: str, paramstyle: str) -> None:
        self.sqlite = dialect_name == "sqlite"
        self.mark = "?" if paramstyle == "qmark" else "%s"
        self._statements: dict[str, tuple[str, tuple[str, ...]]] = {}

    def time(self, epoch: float | None) -> Any:
        if epoch is None:
            return None
        moment = datetime.fromtimestamp(epoch, tz=UTC)
        # SQLite: the text SQLAlchemy's DATETIME stores ("2026-01-02 03:04:05.000006").
        return moment.replace(tzinfo=None).isoformat(" ", "microseconds") if self.sqlite else moment

    @staticmethod
    def json(value: Any) -> str:
        return dumps_text(value)

    def insert(self, connection: Any, table: Table, rows: list[dict[str, Any]]) -> None:
        """INSERT ``rows`` (dicts keyed by column name, every column present) in one executemany."""
        if not rows:
            return
        statement = self._statements.get(table.name)
        if statement is None:
            columns = tuple(column.name for column in table.columns)
            sql = (
                f"INSERT INTO {table.name} ({', '.join(columns)}) "
                f"VALUES ({', '.join([self.mark] * len(columns))})"
            )
            statement = self._statements[table.name] = (sql, columns)
        sql, columns = statement
        connection.exec_driver_sql(sql, [tuple(row[c] for c in columns) for row in rows])
