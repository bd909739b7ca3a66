"""``tokentrail export``: trajectories -> training sequences -> JSONL or Parquet, in bounded memory.

The database is read a batch of trajectories at a time (keyset pagination on created_at, id); each
batch becomes sequences (``sequences.build_sequences``, as the API does) and is written out before
the next is read, so memory depends on the batch, not on the size of the database. Parquet gets one
row group per batch; its schema is ``PARQUET_SCHEMA`` (in the README too).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from sqlalchemy import Engine, bindparam, func, select

from tokentrail.proxy.storage import queries
from tokentrail.proxy.training import policy
from tokentrail.proxy.training.sequences import SequenceMode, TrainingSequence, build_sequences

DEFAULT_BATCH = 500


@dataclass
class ExportSummary:
    trajectories: int = 0
    sequences: int = 0
    tokens: int = 0
    generated_tokens: int = 0
    prefix_mismatches: int = 0
    seconds: float = 0.0
    one_sequence: int = 0  # trajectories whose calls all merged into one sequence without a break
    left_out_by_policy: int = 0  # sequences older than --min-weight-version / --max-staleness allow
    breaks: Counter[str] = field(default_factory=Counter)  # prefix mismatches by the call's drift
    # (id, updated_at, call_count) of each trajectory as it was read: what ``mark_exported`` marks
    read: list[tuple[str, datetime, int]] = field(default_factory=list, repr=False)

    def line(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        causes = ", ".join(f"{cause} {count}" for cause, count in sorted(self.breaks.items()))
        return (
            f"{self.trajectories} trajectories, {self.sequences} sequences, {self.tokens} tokens "
            f"({self.generated_tokens} generated), {self.prefix_mismatches} prefix mismatches"
            f"{f' ({causes})' if causes else ''}, {self.one_sequence} trajectories as one sequence, "
            f"{f'{self.left_out_by_policy} stale sequences left out, ' if self.left_out_by_policy else ''}"
            f"{self.seconds:.1f} s ({rate:,.0f} tokens/s)"
        )


class SequenceSink(Protocol):
    def write(self, sequences: list[TrainingSequence]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class PartitionedSequenceSink(Protocol):
    """A sink that files each trajectory's sequences by the trajectory (``archive.py``)."""

    def write_for(self, row: dict[str, Any], sequences: list[TrainingSequence]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line and sequence, on a binary stream the sink closes."""

    def __init__(self, stream: IO[bytes] | Any) -> None:
        self._file = stream

    def write(self, sequences: list[TrainingSequence]) -> None:
        text = "".join(json.dumps(s.as_dict(), separators=(",", ":")) + "\n" for s in sequences)
        self._file.write(text.encode("utf-8"))

    def close(self) -> None:
        self._file.close()


def parquet_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("trajectory_id", pa.string()),
            ("sequence_index", pa.int32()),
            ("input_ids", pa.list_(pa.int32())),
            ("loss_mask", pa.list_(pa.int8())),
            ("logprobs", pa.list_(pa.float32())),
            ("reward", pa.float64()),
            ("call_ids", pa.list_(pa.string())),
            ("choice_indexes", pa.list_(pa.int32())),
            ("num_tokens", pa.int32()),
            ("num_generated", pa.int32()),
            ("weight_version", pa.string()),
            ("staleness", pa.int32()),
            ("group_id", pa.string()),
            ("advantage", pa.float64()),
            ("certificate_id", pa.string()),
        ]
    )


class ParquetSink:
    """A Parquet file, one row group per batch (loads with pyarrow and ``datasets``)."""

    def __init__(self, where: Path | IO[bytes] | Any) -> None:
        import pyarrow.parquet as pq

        self._schema = parquet_schema()
        self._stream = None if isinstance(where, Path) else where
        target = str(where) if isinstance(where, Path) else where
        self._writer = pq.ParquetWriter(target, self._schema, compression="zstd")

    def write(self, sequences: list[TrainingSequence]) -> None:
        import pyarrow as pa

        if not sequences:
            return
        rows = [s.as_dict() for s in sequences]
        columns = {name: [row[name] for row in rows] for name in self._schema.names}
        self._writer.write_table(pa.Table.from_pydict(columns, schema=self._schema))

    def close(self) -> None:
        self._writer.close()
        if self._stream is not None:  # pyarrow leaves a stream it was given open
            self._stream.close()


def open_sink(fmt: str, path: Path) -> SequenceSink:
    if fmt == "jsonl":
        return JsonlSink(path.open("wb"))
    if fmt == "parquet":
        return ParquetSink(path)
    raise ValueError(f"unknown format {fmt!r}: use jsonl or parquet")


def open_sink_on(fmt: str, stream: IO[bytes] | Any) -> SequenceSink:
    """A sink writing to an open binary stream (a file, or a pyarrow output stream); it closes it."""
    if fmt == "jsonl":
        return JsonlSink(stream)
    if fmt == "parquet":
        return ParquetSink(stream)
    raise ValueError(f"unknown format {fmt!r}: use jsonl or parquet")


def _batches(engine: Engine, filters: queries.TrajectoryFilter, batch: int) -> Iterator[list[dict[str, Any]]]:
    after = None
    while True:
        with engine.connect() as connection:
            rows = queries.list_trajectories(connection, filters, after, batch)
        if not rows:
            return
        yield rows
        after = (rows[-1]["created_at"], rows[-1]["id"])


def _group_batches(
    engine: Engine, filters: queries.TrajectoryFilter, batch: int
) -> Iterator[list[dict[str, Any]]]:
    """The grouped trajectories, a few whole groups at a time, each group's members together."""
    with engine.connect() as connection:
        groups = queries.group_ids(connection, filters)
    chunk: list[dict[str, Any]] = []
    for group_id in groups:
        with engine.connect() as connection:
            chunk.extend(queries.group_trajectories(connection, group_id, filters))
        if len(chunk) >= batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def count_trajectories(engine: Engine, filters: queries.TrajectoryFilter) -> int:
    query = queries.filtered_trajectories(filters).subquery()
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(query)).scalar_one())


def export(
    engine: Engine,
    sink: SequenceSink | PartitionedSequenceSink,
    filters: queries.TrajectoryFilter,
    mode: SequenceMode = SequenceMode.MERGED,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[int], object] | None = None,
    *,
    by_group: bool = False,
    policy_filter: policy.PolicyFilter | None = None,
    remember_read: bool = False,
) -> ExportSummary:
    """Write every matching trajectory's sequences to ``sink``; ``progress(n)`` after each batch.

    ``by_group``: only trajectories in a GRPO group, each group's together, with ``advantage``;
    ``policy_filter``: leave out sequences older than a policy version or more versions behind;
    ``remember_read``: keep each trajectory's id, ``updated_at`` and call count in ``summary.read``
    (for ``mark_exported``; memory then grows with the trajectories exported, ~100 bytes each).
    """
    summary = ExportSummary()
    started = time.perf_counter()
    wanted = policy_filter or policy.PolicyFilter()
    batches = _group_batches(engine, filters, batch) if by_group else _batches(engine, filters, batch)
    try:
        with engine.connect() as connection:
            ranks = policy.version_ranks(connection)
        policy.check_known(wanted, ranks)
        for rows in batches:
            with engine.connect() as connection:
                calls = queries.load_call_tokens(connection, [r["id"] for r in rows])
                call_ids = [call.call_id for chain in calls.values() for call in chain]
                versions = policy.call_versions(connection, call_ids)
                certificates = policy.call_certificates(connection, call_ids)
                advantages = policy.group_advantage_of(
                    connection, {r["group_id"] for r in rows if r["group_id"]}
                )
            out: list[TrainingSequence] = []
            broken: list[str] = []
            for row in rows:
                built = build_sequences(row["id"], calls[row["id"]], row["reward"], mode)
                policy.annotate(built.sequences, versions, ranks, certificates)
                kept = []
                for sequence in built.sequences:
                    sequence.group_id = row["group_id"]
                    sequence.advantage = advantages.get(row["id"])
                    if policy.keep(sequence, wanted, ranks):
                        kept.append(sequence)
                    else:
                        summary.left_out_by_policy += 1
                if isinstance(sink, PartitionedSequenceSink):
                    sink.write_for(row, kept)
                out.extend(kept)
                if remember_read and built.sequences and len(kept) == len(built.sequences):
                    # only what was written whole: a trajectory a policy filter cut is not exported
                    summary.read.append((row["id"], row["updated_at"], row["call_count"]))
                summary.prefix_mismatches += len(built.mismatches)
                broken.extend(m.call_id for m in built.mismatches)
                if len(built.sequences) == 1 and not built.mismatches and mode is SequenceMode.MERGED:
                    summary.one_sequence += 1
            if broken:
                with engine.connect() as connection:
                    summary.breaks.update(queries.drift_of_calls(connection, broken))
            if not isinstance(sink, PartitionedSequenceSink):
                sink.write(out)
            summary.trajectories += len(rows)
            summary.sequences += len(out)
            summary.tokens += sum(len(s.input_ids) for s in out)
            summary.generated_tokens += sum(sum(s.loss_mask) for s in out)
            if progress is not None:
                progress(len(rows))
    finally:
        sink.close()
    summary.seconds = time.perf_counter() - started
    return summary


def mark_exported(engine: Engine, read: list[tuple[str, datetime, int]], batch: int = DEFAULT_BATCH) -> int:
    """Set ``exported_at`` and ``exported_calls`` on the exported trajectories that have not changed
    since the export read them (same ``updated_at`` and call count): a trajectory that got a call or
    a reward meanwhile is not marked, so ``db prune --exported`` keeps it. Call it once the files
    are closed. Returns how many were marked."""
    table = queries.TRAJECTORIES
    statement = (
        table.update()
        .where(
            table.c.id == bindparam("t_id"),
            table.c.updated_at == bindparam("t_updated"),
            table.c.call_count == bindparam("t_calls"),
        )
        .values(exported_at=bindparam("t_now"), exported_calls=bindparam("t_calls"))
    )
    marked = 0
    for start in range(0, len(read), batch):
        now = datetime.now(UTC)
        rows = [
            {"t_id": i, "t_updated": updated, "t_calls": calls, "t_now": now}
            for i, updated, calls in read[start : start + batch]
        ]
        with engine.begin() as connection:
            marked += connection.execute(statement, rows).rowcount
    return marked
