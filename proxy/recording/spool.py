"""The on-disk spool: records the database could not take, kept as JSON lines until they can be replayed.

Why a file and not a bigger queue: an outage can last longer than memory can hold, and a file survives
a restart. The spool is bounded in bytes (``TOKENTRAIL_SPOOL_MAX_BYTES``); what does not fit is counted
as lost and logged, or, with ``TOKENTRAIL_SPOOL_FULL=reject``, the proxy stops accepting recorded calls
(503) until the spool drains.

A record the database refused on its own (its batch went in without it) is spooled with a reason
starting ``refused:``; replay sets it aside in ``<spool>.refused`` instead of trying it again, so one bad
record cannot hold back the others.

Replay is exactly-once: the writer renames the spool to ``<spool>.replaying`` (new spills start a fresh
file), writes its records skipping any ``call_id`` the database already holds (a crash in the middle of a
replay leaves the renamed file; the next replay picks it up and skips what was written), then deletes it.

One process per spool: two proxies on one host started in the same directory would otherwise share the
default path, and one's rename and delete of ``.replaying`` could destroy records the other had just
spooled. ``tokentrail serve`` therefore holds an exclusive lock on ``<spool>.lock`` for its whole life
(``SpoolClaim``; the kernel drops it when the process dies, however it dies) and refuses to start when
another process holds it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokentrail.proxy.recording.capture import read_raw_answer
from tokentrail.proxy.recording.records import CallRecord, ChoiceRecord, Integrity, Outcome

logger = logging.getLogger(__name__)

_RECORD_FIELDS = {f.name for f in dataclasses.fields(CallRecord)} - {"on_stored", "answer", "prompt_ids_text"}
_CHOICE_FIELDS = {f.name for f in dataclasses.fields(ChoiceRecord)}


def record_to_line(record: CallRecord, reason: str) -> str:
    read_raw_answer(record)
    record.load_prompt_ids()
    row = dataclasses.asdict(record)
    del row["on_stored"], row["prompt_ids_text"], row["answer"]
    row["fallback_reason"] = reason
    return json.dumps(row, default=str)


REFUSED = "refused:"


def record_from_line(line: str) -> tuple[CallRecord, str]:
    """The record of a spool line and the reason it was spooled."""
    row: dict[str, Any] = json.loads(line)
    return record_from_row(row), str(row.get("fallback_reason", ""))


def record_from_row(row: dict[str, Any]) -> CallRecord:
    """A record from its fields as JSON gives them back (a spool line's, or the recorder's frames'):
    what is not a field is ignored (``KeyError``/``TypeError``/``ValueError`` for what cannot be one)."""
    fields = {k: v for k, v in row.items() if k in _RECORD_FIELDS}
    fields["choices"] = [
        ChoiceRecord(**{k: v for k, v in c.items() if k in _CHOICE_FIELDS})
        for c in fields.get("choices") or []
    ]
    fields["outcome"] = Outcome(fields.get("outcome", Outcome.OK))
    fields["integrity"] = str(fields.get("integrity", Integrity.NOT_CHECKED))
    return CallRecord(**fields)


class Spool:
    """An append-only JSON-lines file with a byte limit, shared by the event loop and the writer."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.replaying = path.with_name(path.name + ".replaying")
        self.refused = path.with_name(path.name + ".refused")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._bytes = self._size(path)
        self._refused = False  # a record did not fit since the spool last drained
        self._replay_waiting = self.replaying.exists()  # kept in memory: no stat per call

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    @property
    def bytes(self) -> int:
        return self._bytes + (self._size(self.replaying) if self._replay_waiting else 0)

    @property
    def full(self) -> bool:
        """Records wait and the last one did not fit (or the limit is reached): until a replay drains
        the spool, new records would be lost."""
        return self.pending and (self._refused or self.bytes >= self.max_bytes)

    @property
    def pending(self) -> bool:
        return self._bytes > 0 or self._replay_waiting

    def append(self, lines: list[str]) -> bool:
        """Append ``lines`` (owner-only file); False when they do not fit under the limit."""
        data = ("\n".join(lines) + "\n").encode()
        with self._lock:
            if self._bytes + len(data) > self.max_bytes:
                self._refused = True
                return False
            fd = os.open(self.path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
            with os.fdopen(fd, "ab") as handle:
                handle.write(data)
            self._bytes += len(data)
        return True

    def take(self) -> Path | None:
        """The file to replay now: an unfinished ``.replaying`` one, or the spool renamed to it."""
        with self._lock:
            if self._replay_waiting:
                return self.replaying
            if self._bytes == 0:
                return None
            os.replace(self.path, self.replaying)
            self._bytes = 0
            self._replay_waiting = True
            return self.replaying

    def done(self, path: Path) -> None:
        """The replay of ``path`` finished: every record in it is in the database."""
        path.unlink(missing_ok=True)
        with self._lock:
            self._replay_waiting = False
            self._refused = False

    @staticmethod
    def read(path: Path) -> Iterator[tuple[CallRecord | None, str, str]]:
        """(record, reason it was spooled, line) for each line of ``path``; the record is None for a
        line a crash cut short."""
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    try:
                        record, reason = record_from_line(line)
                    except (ValueError, TypeError, KeyError):
                        yield None, "", line
                    else:
                        yield record, reason, line

    def set_aside(self, lines: list[str]) -> None:
        """Keep lines that must not be replayed (records the database refused on their own) in
        ``<spool>.refused``, owner-only, for a person to look at."""
        if not lines:
            return
        fd = os.open(self.refused, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write("".join(line if line.endswith("\n") else line + "\n" for line in lines))


class SpoolInUseError(RuntimeError):
    """Another live process holds the spool's lock."""


class SpoolClaim:
    """This process's exclusive hold on one spool path (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.lock_path = path.with_name(path.name + ".lock")
        self._fd: int | None = None
        try:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as exc:  # the spool's directory is not writable: spilling will fail and say so
            logger.warning(
                "path=<%s>, error=<%s> | could not create the spool's lock file", self.lock_path, exc.strerror
            )
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolInUseError(
                f"the spool {path} is in use by another TokenTrail process; give each proxy process "
                "its own TOKENTRAIL_FALLBACK_PATH"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None
