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

# SQLite allows 32,766 parameters per statement (since 3.32); PostgreSQL 65,535.
_MAX_PARAMETERS = 32_000
_MAX_ROWS_PER_STATEMENT = 500


class RowEncoder:
    """Values and INSERT statements for one database dialect."""

    def __init__(self, dialect_name: str, paramstyle: str) -> None:
        self.sqlite = dialect_name == "sqlite"
        self.mark = "?" if paramstyle == "qmark" else "%s"
        self._second = -1
        self._second_text = ""

    def time(self, epoch: float | None) -> Any:
        if epoch is None:
            return None
        if not self.sqlite:
            return datetime.fromtimestamp(epoch, tz=UTC)
        # SQLite: the text SQLAlchemy's DATETIME stores ("2026-01-02 03:04:05.000006"). Built from a
        # cached whole second and the microseconds, rounded as datetime.fromtimestamp rounds them
        # (half to even): a third of the writer thread's time went to datetime objects before.
        second, fraction = divmod(epoch, 1.0)
        micro = round(fraction * 1e6)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        whole = int(second)
        if whole != self._second:
            self._second = whole
            self._second_text = datetime.fromtimestamp(whole, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
        return f"{self._second_text}.{micro:06d}"

    @staticmethod
    def json(value: Any) -> str:
        return dumps_text(value)

    def insert(
        self,
        connection: Any,
        table: Table | tuple[str, tuple[str, ...]],
        rows: list[dict[str, Any]],
        *,
        suffix: str = "",
    ) -> None:
        """INSERT ``rows`` (dicts keyed by column name) into ``table`` (every column of a Table, or a
        name and the columns to fill), many rows per statement, ``suffix`` (an ON CONFLICT clause)
        after the values.

        One statement with many ``VALUES`` groups rather than an executemany: the sqlite3 module
        releases the GIL around every row it steps, and while the event loop is busy this thread then
        waits up to a switch interval (5 ms) to get it back, for every row. Measured under a
        saturated event loop, that throttled the writer to a few hundred records a second.
        """
        if not rows:
            return
        if isinstance(table, tuple):
            name, columns = table
        else:
            name, columns = table.name, tuple(column.name for column in table.columns)
        per_statement = max(1, min(_MAX_ROWS_PER_STATEMENT, _MAX_PARAMETERS // len(columns)))
        group = "(" + ", ".join([self.mark] * len(columns)) + ")"
        head = f"INSERT INTO {name} ({', '.join(columns)}) VALUES "
        for start in range(0, len(rows), per_statement):
            chunk = rows[start : start + per_statement]
            values = tuple(row[c] for row in chunk for c in columns)
            connection.exec_driver_sql(f"{head}{', '.join([group] * len(chunk))} {suffix}", values)
