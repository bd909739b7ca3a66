"""Delete whole trajectories, a batch at a time, without holding the writer up.

Why whole: each call is stored against an earlier call of its trajectory (``stored_calls.py``), and
the foreign key on ``base_call_id`` (migration 0007) refuses to delete a base while a call stored
against it remains. A trajectory is selected by its own row (created before a time, tags, finished,
exported); its calls go with it, including calls made after the cut-off, so none is left without its
base and no prompt reads back cut short.

Each batch is one short transaction: select up to ``batch`` trajectories, delete their completions,
calls and rows. The writer waits for it (SQLite has one writer at a time; on PostgreSQL the writer
locks a trajectory's row before it adds calls to it), so a batch is kept small and the prune rests
as long as the batch took before the next: the writer gets the database at least half the time.

Against a running proxy: on SQLite the batch begins ``IMMEDIATE`` (takes the write lock first, so
what it selects cannot change before it deletes); on PostgreSQL it locks the selected rows ``FOR
UPDATE SKIP LOCKED``, so a trajectory the writer is adding calls to right now is left for the next
run (batches go on past it, in (created_at, id) order) instead of waiting (or deadlocking) on it. A
call recorded after its trajectory was deleted starts that trajectory again (the writer numbers it
from the database: ``seq`` 0, stored whole), so nothing recorded is lost and no base dangles.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    LargeBinary,
    Select,
    and_,
    cast,
    delete,
    func,
    literal,
    literal_column,
    or_,
    select,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.sql.elements import ColumnElement

from tokentrail.proxy.storage import queries
from tokentrail.proxy.storage.models import Completion, LlmCall, Trajectory

TRAJECTORIES = Trajectory.__table__  # type: ignore[attr-defined]
CALLS = LlmCall.__table__  # type: ignore[attr-defined]
COMPLETIONS = Completion.__table__  # type: ignore[attr-defined]

DEFAULT_BATCH = 50  # trajectories per transaction: ~500 calls, ~15 ms on SQLite (bench/prune.py)
_IDS_PER_QUERY = 500
_RETRY_BACKOFF_S = (0.25, 1.0, 3.0)

logger = logging.getLogger(__name__)


class EmptySelectionError(ValueError):
    """A prune with no selection at all would delete everything: refused."""


@dataclass(frozen=True)
class PruneSelection:
    """Which trajectories to delete: all of the given conditions hold."""

    before: datetime | None = None  # created (first call) before this time
    tags: dict[str, str] | None = None
    finished: bool | None = None
    exported: bool = False  # written by ``export --mark-exported`` and unchanged since
    trajectory_ids: tuple[str, ...] | None = None

    def check(self) -> None:
        if (
            self.before is None
            and not self.tags
            and self.finished is None
            and not self.exported
            and self.trajectory_ids is None
        ):
            raise EmptySelectionError(
                "say which trajectories to delete (--before, --tag, --finished, --exported or --ids)"
            )


@dataclass
class PruneSummary:
    trajectories: int = 0
    calls: int = 0
    completions: int = 0
    bytes: int = 0  # row data of the calls and completions (indexes not counted)
    batches: int = 0
    seconds: float = 0.0
    longest_batch_s: float = 0.0
    stopped: bool = False
    batch_seconds: list[float] = field(default_factory=list, repr=False)

    def line(self, *, with_bytes: bool = True) -> str:
        counts = f"{self.trajectories} trajectories, {self.calls} calls, {self.completions} completions"
        return f"{counts}, {human_bytes(self.bytes)} of row data" if with_bytes else counts


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _conditions(selection: PruneSelection, ids: list[str] | None) -> list[ColumnElement[bool]]:
    filters = queries.TrajectoryFilter(
        until=selection.before, finished=selection.finished, tags=selection.tags
    )
    conditions = queries.trajectory_conditions(filters)
    if selection.exported:  # every call it has now was exported, and nothing changed after
        conditions.append(TRAJECTORIES.c.exported_at.is_not(None))
        conditions.append(TRAJECTORIES.c.exported_calls == TRAJECTORIES.c.call_count)
        conditions.append(TRAJECTORIES.c.exported_at >= TRAJECTORIES.c.updated_at)
    if ids is not None:
        conditions.append(TRAJECTORIES.c.id.in_(ids))
    return conditions


def _id_chunks(selection: PruneSelection) -> Iterator[list[str] | None]:
    """The id lists to select within (one ``None`` when the selection names no ids)."""
    if selection.trajectory_ids is None:
        yield None
        return
    ids = list(dict.fromkeys(selection.trajectory_ids))
    for start in range(0, len(ids), _IDS_PER_QUERY):
        yield ids[start : start + _IDS_PER_QUERY]


def _row_bytes(connection: Connection, table: Any) -> ColumnElement[Any]:
    """An expression for the bytes of one row's data (PostgreSQL: as stored, compressed or not;
    SQLite: the length of each value as text or blob)."""
    if connection.dialect.name == "postgresql":
        return func.pg_column_size(literal_column(f"{table.name}.*"))
    total: ColumnElement[Any] = literal(0)
    for column in table.c:
        total = total + func.coalesce(func.length(cast(column, LargeBinary)), 0)
    return total


def _measure(connection: Connection, trajectory_ids: Select[Any]) -> tuple[int, int, int]:
    """(calls, completions, bytes) of the trajectories whose ids ``trajectory_ids`` selects."""
    calls_of = select(CALLS.c.id).where(CALLS.c.trajectory_id.in_(trajectory_ids))
    sizes = []
    for table, where in (
        (CALLS, CALLS.c.trajectory_id.in_(trajectory_ids)),
        (COMPLETIONS, COMPLETIONS.c.call_id.in_(calls_of)),
    ):
        query = select(func.count(), func.coalesce(func.sum(_row_bytes(connection, table)), 0)).where(where)
        sizes.append(connection.execute(query).one())
    (calls, call_bytes), (completions, completion_bytes) = sizes
    return int(calls), int(completions), int(call_bytes) + int(completion_bytes)


def plan(engine: Engine, selection: PruneSelection) -> PruneSummary:
    """What ``prune`` would delete now (the dry run): counts and bytes, nothing deleted."""
    selection.check()
    summary = PruneSummary()
    with engine.connect() as connection:
        for ids in _id_chunks(selection):
            chosen = select(TRAJECTORIES.c.id).where(*_conditions(selection, ids))
            summary.trajectories += int(
                connection.execute(select(func.count()).select_from(chosen.subquery())).scalar_one()
            )
            calls, completions, size = _measure(connection, chosen)
            summary.calls += calls
            summary.completions += completions
            summary.bytes += size
    return summary


def prune(
    engine: Engine,
    selection: PruneSelection,
    *,
    batch: int = DEFAULT_BATCH,
    measure: bool = True,
    stop: threading.Event | None = None,
    progress: Callable[[PruneSummary], object] | None = None,
) -> PruneSummary:
    """Delete the selected trajectories whole, ``batch`` at a time (see the module docstring).

    ``measure``: also add up the bytes of what is deleted (reads the rows once more);
    ``stop``: set it to end after the current batch; ``progress(summary)`` after each batch.
    """
    selection.check()
    summary = PruneSummary()
    started = time.perf_counter()
    for ids in _id_chunks(selection):
        after: tuple[datetime, str] | None = None
        while not (stop is not None and stop.is_set()):
            batch_started = time.perf_counter()
            done, after = _batch_with_retries(engine, selection, ids, after, max(1, batch), measure, summary)
            took = time.perf_counter() - batch_started
            if not done:
                break
            summary.batches += 1
            summary.batch_seconds.append(took)
            summary.longest_batch_s = max(summary.longest_batch_s, took)
            if progress is not None:
                progress(summary)
            # Rest as long as the batch held the database: the writer's turn.
            if stop is not None:
                stop.wait(took)
            else:
                time.sleep(took)
    summary.stopped = stop is not None and stop.is_set()
    summary.seconds = time.perf_counter() - started
    return summary


def _batch_with_retries(
    engine: Engine,
    selection: PruneSelection,
    ids: list[str] | None,
    after: tuple[datetime, str] | None,
    batch: int,
    measure: bool,
    summary: PruneSummary,
) -> tuple[int, tuple[datetime, str] | None]:
    """One batch; a batch that could not get the database (SQLite busy past its timeout, a lost
    PostgreSQL connection, a deadlock) rolled back whole and is tried again, a few times."""
    for wait in (*_RETRY_BACKOFF_S, None):
        try:
            return _prune_batch(engine, selection, ids, after, batch, measure, summary)
        except OperationalError as exc:
            if wait is None:
                raise
            logger.warning("error=<%s> | prune batch rolled back; trying again", _first_line(exc))
            time.sleep(wait)
    raise AssertionError("unreachable")


def _first_line(error: Exception) -> str:
    return str(getattr(error, "orig", None) or error).splitlines()[0][:200]


def _prune_batch(
    engine: Engine,
    selection: PruneSelection,
    ids: list[str] | None,
    after: tuple[datetime, str] | None,
    batch: int,
    measure: bool,
    summary: PruneSummary,
) -> tuple[int, tuple[datetime, str] | None]:
    """One transaction; returns (trajectories deleted, where the next batch starts)."""
    with engine.connect() as connection:
        postgres = connection.dialect.name == "postgresql"
        if not postgres:
            connection.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock first: the selection holds
        query = (
            select(TRAJECTORIES.c.id, TRAJECTORIES.c.created_at)
            .where(*_conditions(selection, ids))
            .order_by(TRAJECTORIES.c.created_at, TRAJECTORIES.c.id)
            .limit(batch)
        )
        if after is not None:
            created, last_id = after
            query = query.where(
                or_(
                    TRAJECTORIES.c.created_at > created,
                    and_(TRAJECTORIES.c.created_at == created, TRAJECTORIES.c.id > last_id),
                )
            )
        if postgres:
            query = query.with_for_update(skip_locked=True)
        rows = connection.execute(query).all()
        if not rows:
            connection.rollback()
            return 0, after
        chosen = [row.id for row in rows]
        if measure:
            _calls, _completions, size = _measure(
                connection, select(TRAJECTORIES.c.id).where(TRAJECTORIES.c.id.in_(chosen))
            )
            summary.bytes += size
        calls_of = select(CALLS.c.id).where(CALLS.c.trajectory_id.in_(chosen))
        summary.completions += connection.execute(
            delete(COMPLETIONS).where(COMPLETIONS.c.call_id.in_(calls_of))
        ).rowcount
        summary.calls += connection.execute(delete(CALLS).where(CALLS.c.trajectory_id.in_(chosen))).rowcount
        summary.trajectories += connection.execute(
            delete(TRAJECTORIES).where(TRAJECTORIES.c.id.in_(chosen))
        ).rowcount
        connection.commit()
    last = rows[-1]
    return len(rows), (last.created_at, last.id)
