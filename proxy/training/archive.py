"""``tokentrail export --out-dir``: one file per day or per tag value, in a folder or an object store.

Why: an archive is read back a day (or a task, a run) at a time, and a prune after it must be sure
that what it deletes is in a file. Files are laid out as Hive partitions,
``<dir>/day=2026-12-07/part-<run>.parquet`` or ``<dir>/<tag>=<value>/part-<run>.jsonl``, which
``pyarrow.dataset``, ``datasets`` and Spark read with the partition as a column. Each run writes new
``part-`` files and never replaces one, so archiving again (a day that had more calls since) adds to
the archive instead of overwriting what was archived, and maybe pruned, before.

A directory is a local path or any URL ``pyarrow.fs.FileSystem.from_uri`` opens (``s3://``,
``gs://``, ``hdfs://``, ``file://``), with the credentials pyarrow finds itself.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from tokentrail.proxy.training.export import SequenceSink, open_sink_on
from tokentrail.proxy.training.sequences import TrainingSequence

UNTAGGED = "_untagged"  # the partition of trajectories without the tag


class BadSplitError(ValueError):
    """``--split`` is neither ``day`` nor ``tag:<key>``."""


def partition_key(split: str) -> Callable[[dict[str, Any]], str]:
    """The partition folder of a trajectory row, for ``--split day`` or ``--split tag:<key>``."""
    if split == "day":
        return lambda row: f"day={_utc(row['created_at']).date().isoformat()}"
    kind, _, key = split.partition(":")
    if kind != "tag" or not key:
        raise BadSplitError(f"--split {split!r}: use day or tag:<key>")

    def by_tag(row: dict[str, Any]) -> str:
        value = (row.get("tags") or {}).get(key)
        return UNTAGGED if value is None else f"{quote(key, safe='')}={quote(str(value), safe='')}"

    return by_tag


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


class _Folder:
    """Where the files go: a local folder, or a pyarrow file system and the path in it."""

    def __init__(self, where: str) -> None:
        self._fs: Any = None
        if "://" in where:
            from pyarrow import fs

            self._fs, self._root = fs.FileSystem.from_uri(where)
        else:
            self._root = str(Path(where).resolve())

    def open(self, folder: str, name: str) -> tuple[IO[bytes] | Any, str]:
        """A new file ``name`` in the sub-folder ``folder`` for writing, and its path."""
        path = f"{self._root.rstrip('/')}/{folder}/{name}"
        if self._fs is None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return open(path, "xb"), path  # closed by the sink; "x": never replace a file
        self._fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return self._fs.open_output_stream(path), path


class PartitionedSink:
    """One sink per partition, opened when its first sequence comes; all closed at the end."""

    def __init__(self, fmt: str, where: str, key: Callable[[dict[str, Any]], str]) -> None:
        self._fmt = fmt
        self._folder = _Folder(where)
        self._key = key
        self._run = f"part-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        self._sinks: dict[str, SequenceSink] = {}
        self.files: list[str] = []
        if fmt == "parquet":
            import pyarrow  # noqa: F401 - fail now, before anything is read, when the extra is missing

    def write_for(self, row: dict[str, Any], sequences: list[TrainingSequence]) -> None:
        key = self._key(row)
        sink = self._sinks.get(key)
        if sink is None:
            stream, path = self._folder.open(key, f"{self._run}.{self._fmt}")
            sink = open_sink_on(self._fmt, stream)
            self._sinks[key] = sink
            self.files.append(path)
        sink.write(sequences)

    def write(self, sequences: list[TrainingSequence]) -> None:
        raise TypeError("a partitioned sink is written with write_for")

    def close(self) -> None:
        errors = []
        for sink in self._sinks.values():
            try:
                sink.close()
            except OSError as exc:  # close the others all the same
                errors.append(exc)
        if errors:
            raise errors[0]


def describe(files: list[str]) -> str:
    folders = sorted({os.path.dirname(f) for f in files})
    return f"{len(files)} files in {len(folders)} folders"
