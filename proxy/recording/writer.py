"""The bounded record queue and the one background thread that writes it to the database in batches.

The request path only ever calls ``RecordWriter.submit`` (a ``put_nowait``) and ``next_ordinal`` (a
dict lookup): it never waits on the database. The writer thread commits up to ``batch_size`` records
per transaction. A batch that fails is retried; after the retries each record is tried alone, and a
record that still cannot be written is appended to the fallback JSONL file, counted and logged.
When the queue is full the record goes straight to the fallback file: nothing is dropped silently.

``seq`` numbers the calls of a trajectory without gaps, in arrival order: the relay takes an ordinal
(0, 1, 2, ... per trajectory, in this process) when a call arrives; the writer holds a record back
until every earlier-arrived call of its trajectory has been written (a call that is still running
cannot take long to end, and each ends with exactly one record), then gives it the next ``seq`` after
the largest one in the database, read in the same transaction after the trajectory's row was
upserted. That upsert locks the row, so proxy replicas writing calls of one trajectory to one
PostgreSQL take turns and never hand out one ``seq`` twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine, inspect, select

from tokentrail.proxy import jsonio
from tokentrail.proxy.recording.certificate import Certificate, certify
from tokentrail.proxy.recording.order import POLL_S, ReplyOrder
from tokentrail.proxy.recording.records import GOOD_INTEGRITY, CallRecord
from tokentrail.proxy.recording.spool import REFUSED, Spool, record_to_line
from tokentrail.proxy.storage.bulk import RowEncoder
from tokentrail.proxy.storage.models import Completion, LlmCall, Trajectory
from tokentrail.proxy.storage.stored_calls import StoredForm, whole

logger = logging.getLogger(__name__)

_STOP = object()


class _Skip:
    """Queued by ``skip``: an arrived call whose record will never come."""

    __slots__ = ("ordinal", "trajectory_id")

    def __init__(self, trajectory_id: str, ordinal: int) -> None:
        self.trajectory_id = trajectory_id
        self.ordinal = ordinal


_RETRY_BACKOFF_S = (0.05, 0.25, 1.0, 2.0)
_REPLAY_EVERY_S = 1.0
GATHER_S = 0.02
THREAD_NAME = "tokentrail-writer"
# The columns a new trajectory row gets from the writer; the others keep their defaults (NULL).
_TRAJECTORY_INSERT = (
    "trajectories",
    (
        "id",
        "created_at",
        "updated_at",
        "call_count",
        "prompt_tokens",
        "completion_tokens",
        "id_generated",
        "finished",
        "group_id",
    ),
)
_WEIGHT_VERSION_INSERT = ("weight_versions", ("version", "first_seen_at"))
CERTIFICATES_TABLE = "certificates"
CERTIFICATE_FIELDS = tuple(f.name for f in dataclasses.fields(Certificate))  # its columns, in order
_CERTIFICATE_INSERT = (CERTIFICATES_TABLE, (*CERTIFICATE_FIELDS, "first_seen_at"))


class RecordSink(Protocol):
    """What the relay needs from the writer (or from the recorder process, ``proxy/recorder/``)."""

    def arrive(self, call_id: str, trajectory_id: str) -> int:
        """A call of a named trajectory arrived: its arrival ordinal."""

    def submit(self, record: CallRecord) -> None: ...

    @property
    def accepting(self) -> bool: ...

    @property
    def reads_answers(self) -> bool:
        """Whether it reads a ``CallRecord.answer`` the relay did not (``capture.RawAnswer``)."""


BatchCounter = Callable[[Any, RowEncoder, list[CallRecord]], None]
"""Adds a batch's metric counts, given the open connection of the batch's transaction."""


class CallJudge(Protocol):
    """How each call relates to its trajectory's earlier calls (``trajectory/drift.py``'s
    ``DriftJudge``): its drift, and the form it is stored in, decided inside the batch's transaction."""

    def judge(
        self, connection: Any, records: list[tuple[CallRecord, int]], forms: dict[str, StoredForm]
    ) -> Any:
        """Set each record's drift and put its stored form in ``forms``; returns what ``remember``
        keeps once the batch is committed."""

    def remember(self, judged: Any) -> None: ...

    def forget(self, trajectory_ids: set[str]) -> None:
        """These trajectories were written outside ``judge`` (a spool replay)."""

    def awaits_reply(self, connection: Any, record: CallRecord, earlier: Sequence[CallRecord]) -> str | None:
        """What ``record`` waits for: its history holds a reply no recorded call gave (``order.py``)."""


class _StoreWhole:
    """No judge: every call stored whole, no drift (a writer made without one)."""

    def judge(
        self, connection: Any, records: list[tuple[CallRecord, int]], forms: dict[str, StoredForm]
    ) -> None:
        return None

    def remember(self, judged: Any) -> None:
        return None

    def forget(self, trajectory_ids: set[str]) -> None:
        return None

    def awaits_reply(self, connection: Any, record: CallRecord, earlier: Sequence[CallRecord]) -> str | None:
        return None


class RecordWriter:
    """Owns the queue, the writer thread and the fallback file."""

    def __init__(
        self,
        engine: Engine,
        *,
        queue_size: int,
        batch_size: int,
        retries: int,
        fallback_path: Path,
        gather_s: float = GATHER_S,
        spool_max_bytes: int = 2**30,
        reject_when_spool_full: bool = False,
        count: BatchCounter | None = None,
        judge: CallJudge | None = None,
        order_wait_s: float = 5.0,
        peers: Callable[[], bool] | None = None,
    ) -> None:
        # Adds each batch's metric counts in the transaction that writes the batch (the metrics), on
        # the writer thread, so that the request path pays nothing and the counts equal the database.
        self._count = count
        self._spool = Spool(fallback_path, spool_max_bytes)
        self._reject_when_spool_full = reject_when_spool_full
        self._last_replay = 0.0
        self._gather_s = gather_s
        self._engine = engine
        # A SimpleQueue (C, no condition variable: a put costs a tenth of queue.Queue's) bounded
        # here by its length; only the event loop puts records, so the bound holds exactly.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._queue_size = queue_size
        self._batch_size = batch_size
        self._retries = retries
        self._fallback_lock = threading.Lock()
        self._ordinals: dict[str, int] = {}
        self._ordinals_lock = threading.Lock()  # next_ordinal (event loop) vs pruning (writer thread)
        self._next_to_write: dict[str, int] = {}  # writer thread only
        self._held: dict[str, dict[int, CallRecord]] = {}  # writer thread only
        self._skipped: set[tuple[str, int]] = set()  # ordinals that went to the fallback file
        self._skipped_lock = threading.Lock()
        self._row_encoder: RowEncoder | None = None  # made on first write, for the engine's dialect
        # The call columns and certificates (0009) the schema has: a proxy may write into a database
        # that an older TokenTrail made and has not migrated yet; its calls then lack the newer
        # columns (certificates, 0009; order_wait, 0011). Looked at once.
        self._call_columns: tuple[str, ...] | None = None
        self._certificates = False
        self._drift: CallJudge = judge or _StoreWhole()  # writer thread only
        # records waiting for the record of a reply their history holds (other writers: ``peers``)
        self._order = ReplyOrder(order_wait_s, peers, self.largest_seqs)
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._progress = threading.Condition()
        self.submitted = 0
        self.written = 0
        self.failed = 0  # records that went to the spool (or were lost when it was full)
        self.lost = 0  # records the spool could not take
        self.replayed = 0  # spooled records written to the database later
        self.refused = 0  # spooled records the database refused on their own: set aside, not replayed
        self.failure_reasons: Counter[str] = Counter()
        self.integrity_problems = 0
        self.integrity_counts: Counter[str] = Counter()

    # ---- request path (event loop thread) ----

    def next_ordinal(self, trajectory_id: str) -> int:
        """The arrival ordinal of a new call in ``trajectory_id`` (0 for its first in this process)."""
        with self._ordinals_lock:
            ordinal = self._ordinals.get(trajectory_id, 0)
            self._ordinals[trajectory_id] = ordinal + 1
        return ordinal

    def arrive(self, call_id: str, trajectory_id: str) -> int:
        return self.next_ordinal(trajectory_id)

    def skip(self, trajectory_id: str, ordinal: int) -> None:
        """The call given ``ordinal`` will never have a record (the relay that took it died): its
        trajectory's later records are not held back for it."""
        self._queue.put_nowait(_Skip(trajectory_id, ordinal))

    def submit(self, record: CallRecord) -> None:
        """Queue one finished record; never blocks. A full queue spills it to the fallback file."""
        self.submitted += 1
        if self._queue.qsize() < self._queue_size:
            self._queue.put_nowait(record)
        else:
            if record.seq is not None:
                with self._skipped_lock:
                    self._skipped.add((record.trajectory_id, record.seq))
            record.load_prompt_ids()
            self._spill([record], "queue_full")

    @property
    def reads_answers(self) -> bool:
        return False  # this thread shares the relay's core: the relay reads answers as they pass

    @property
    def accepting(self) -> bool:
        """False while the spool is full and the proxy was told to refuse calls it cannot record."""
        return not (self._reject_when_spool_full and self._spool.full)

    @property
    def spool(self) -> Spool:
        return self._spool

    @property
    def known_trajectories(self) -> int:
        """Trajectories with calls still open or unwritten (the others are forgotten)."""
        with self._ordinals_lock:
            return len(self._ordinals)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def held(self) -> int | None:
        """Records waiting for the record of a reply their history holds (``order.py``)."""
        return self._order.held

    def wait_settled(self, count: int, timeout: float) -> bool:
        """Block until ``count`` records in all were written or spilled (for tests and tools)."""
        with self._progress:
            return self._progress.wait_for(lambda: self.written + self.failed >= count, timeout)

    # ---- lifecycle ----

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Write everything queued, then stop the thread (waits at most ``timeout`` seconds)."""
        if not self._thread.is_alive():
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("timeout_s=<%s> | writer did not drain in time", timeout)

    # ---- writer thread ----

    def _run(self) -> None:
        _name_os_thread(THREAD_NAME)
        stopping = False
        while not stopping:
            try:
                # With records in the spool, wake up now and then to replay them even when idle, and
                # more often while records wait for an earlier turn's (order.py).
                first = self._queue.get(timeout=self._idle_wake_s())
            except queue.Empty:
                self._maybe_replay(database_works=False)  # (a held record may wait for a spooled one)
                if not self._order.held:
                    continue
                first = None  # a poll: the held records look again
            batch: list[CallRecord] = []
            skipped: set[str] = set()
            if first is _STOP:
                stopping = True
            elif isinstance(first, _Skip):
                skipped.add(self._note_skip(first))
            elif first is not None:
                batch.append(first)
            # Gather for a moment: one transaction for many records costs little more than for one.
            # Sleep rather than wait on the queue, so that each submit does not wake this thread
            # (every wake-up takes the GIL from the event loop).
            if not stopping and self._gather_s and self._queue.qsize() < self._batch_size:
                time.sleep(self._gather_s)
            while len(batch) < self._batch_size and not stopping:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    continue
                if isinstance(item, _Skip):
                    skipped.add(self._note_skip(item))
                    continue
                batch.append(item)
            for record in batch:
                record.load_prompt_ids()  # parsed here, off the event loop (records.py)
            ready = self._in_arrival_order(batch, flush=stopping, touched=skipped)
            ready = self._order.release(self._engine, self._drift, ready, flush=stopping)
            if ready and self._write_with_retries(ready):
                self._maybe_replay(database_works=True)
            with self._progress:
                self._progress.notify_all()

    def largest_seqs(self, connection: Any, trajectory_ids: set[str]) -> dict[str, int]:
        """Each trajectory's largest recorded seq (-1 for none): what ``ReplyOrder`` polls."""
        found = _next_seqs(connection, trajectory_ids, self._encoder(connection))
        return {trajectory_id: next_seq - 1 for trajectory_id, next_seq in found.items()}

    def _idle_wake_s(self) -> float | None:
        if self._order.held:
            return POLL_S
        return _REPLAY_EVERY_S if self._spool.pending else None

    def _count_in(self, connection: Any, encoder: RowEncoder, batch: list[CallRecord]) -> None:
        """Add the batch's metric counts, in a savepoint: a failure there (a bug in the metrics, a
        database not upgraded yet) loses counts, never the batch."""
        if self._count is None:
            return
        try:
            with connection.begin_nested():
                self._count(connection, encoder, batch)
        except Exception as exc:
            logger.error("error=<%s> | the batch's metric counts were not written", type(exc).__name__)

    def _write_with_retries(self, batch: list[CallRecord]) -> bool:
        """Write ``batch``; True when it is in the database. Otherwise its records are in the spool."""
        error: Exception | None = None
        for attempt in range(self._retries + 1):
            try:
                self._write_batch(batch)
            except Exception as exc:  # any database failure: retry, never lose the batch
                error = exc
                if attempt < self._retries:
                    time.sleep(_RETRY_BACKOFF_S[min(attempt, len(_RETRY_BACKOFF_S) - 1)])
                continue
            self._count_written(batch)
            return True
        reason = f"db_error:{type(error).__name__}"
        logger.warning(
            "records=<%d>, error=<%s: %s> | batch failed after retries", len(batch), type(error).__name__,
            _describe(error),
        )  # fmt: skip
        # One record alone failing the same way means the database is the problem (locked, gone),
        # not one record's data: then the whole batch goes to the spool at once, to be replayed.
        try:
            self._write_batch(batch[:1])
        except Exception as exc:
            if type(exc) is type(error) and _describe(exc) == _describe(error):
                self._spill(batch, reason)
                return False
            self._spill(batch[:1], f"{REFUSED}{type(exc).__name__}")
        else:
            self._count_written(batch[:1])
        for record in batch[1:]:
            try:
                self._write_batch([record])
            except Exception as exc:  # the database refuses this record: spooled, never replayed
                self._spill([record], f"{REFUSED}{type(exc).__name__}")
            else:
                self._count_written([record])
        return False

    def _maybe_replay(self, *, database_works: bool) -> None:
        """Write the spooled records to the database, at most every ``_REPLAY_EVERY_S``.

        ``database_works``: a write has just succeeded, so a record the database refuses now is
        refused for its own sake (it is set aside); otherwise a failure postpones the whole replay.
        """
        if not self._spool.pending or time.monotonic() - self._last_replay < _REPLAY_EVERY_S:
            return
        self._last_replay = time.monotonic()
        path = self._spool.take()
        if path is None:
            return
        replayed = cut = 0
        refused: list[str] = []
        try:
            chunk: list[tuple[CallRecord, str]] = []
            for record, reason, line in Spool.read(path):
                if record is None:
                    cut += 1
                elif reason.startswith(REFUSED):
                    refused.append(line)
                else:
                    chunk.append((record, line))
                if len(chunk) >= self._batch_size:
                    replayed += self._replay_chunk(chunk, refused, database_works=database_works)
                    chunk = []
            if chunk:
                replayed += self._replay_chunk(chunk, refused, database_works=database_works)
        except Exception as exc:  # the database is still unwell: the file stays for the next try
            logger.warning("path=<%s>, error=<%s> | spool replay postponed", path, type(exc).__name__)
            return
        self._spool.set_aside(refused)
        self._spool.done(path)
        self.refused += len(refused)
        if refused:
            logger.error(
                "records=<%d>, path=<%s> | records the database refused are kept aside, not replayed",
                len(refused),
                self._spool.refused,
            )
        if cut:
            self.lost += cut
            self.failure_reasons["spool_line_cut"] += cut
            logger.error("records=<%d> | spool lines cut short by a crash could not be replayed", cut)
        logger.warning("records=<%d> | spooled records replayed into the database", replayed)

    def _replay_chunk(
        self, chunk: list[tuple[CallRecord, str]], refused: list[str], *, database_works: bool
    ) -> int:
        """Write the records of ``chunk`` the database does not hold yet (exactly once); the lines of
        records it refuses on their own go to ``refused``."""
        with self._engine.connect() as connection:
            encoder = self._encoder(connection)
            marks = ", ".join([encoder.mark] * len(chunk))
            present = set(
                connection.exec_driver_sql(
                    f"SELECT id FROM llm_calls_stored WHERE id IN ({marks})",
                    tuple(r.call_id for r, _ in chunk),
                ).scalars()
            )
        todo = [(record, line) for record, line in chunk if record.call_id not in present]
        self._drift.forget({record.trajectory_id for record, _line in todo})
        for record, _line in todo:
            if record.seq is not None:
                record.seq = 0  # a named trajectory: numbered after what the database holds
        try:
            if todo:
                self._write_batch([record for record, _line in todo])
            written = len(todo)
        except Exception:
            if not database_works:
                raise
            written = 0
            for record, line in todo:
                try:
                    self._write_batch([record])
                    written += 1
                except Exception:  # the database works, so this record is the problem
                    refused.append(line)
        self.replayed += written
        return written

    def _count_written(self, batch: list[CallRecord]) -> None:
        self.written += len(batch)
        for record in batch:
            self.integrity_counts[record.integrity] += 1
            if record.integrity not in GOOD_INTEGRITY:
                self.integrity_problems += 1
            if record.on_stored is not None:
                record.on_stored(True)

    def _note_skip(self, skip: _Skip) -> str:
        with self._skipped_lock:
            self._skipped.add((skip.trajectory_id, skip.ordinal))
        return skip.trajectory_id

    def _in_arrival_order(
        self, batch: list[CallRecord], *, flush: bool, touched: set[str] | None = None
    ) -> list[CallRecord]:
        """The records that may be written now, each trajectory's in arrival order (see the docstring);
        ``touched``: trajectories to look at even without a record in ``batch`` (a skip came)."""
        ready = [r for r in batch if r.seq is None]
        touched = set(touched or ())
        for record in batch:
            if record.seq is not None:
                self._held.setdefault(record.trajectory_id, {})[record.seq] = record
                touched.add(record.trajectory_id)
        for trajectory_id in touched if not flush else list(self._held):
            held = self._held.setdefault(trajectory_id, {})
            expected = self._next_to_write.get(trajectory_id, 0)
            while True:
                if expected in held:
                    ready.append(held.pop(expected))
                elif self._take_skipped(trajectory_id, expected):
                    pass
                else:
                    break
                expected += 1
            if flush and held:  # shutting down: a call never ended; keep what came
                logger.warning(
                    "trajectory=<%s>, records=<%d> | writing records out of order", trajectory_id, len(held)
                )
                for ordinal in sorted(held):
                    ready.append(held.pop(ordinal))
                    expected = ordinal + 1
            self._next_to_write[trajectory_id] = expected
            if not held:
                del self._held[trajectory_id]
                self._forget_if_idle(trajectory_id, expected)
        return ready

    def _forget_if_idle(self, trajectory_id: str, written: int) -> None:
        """Drop a trajectory's ordinals once every call it was given is written, so that memory does
        not grow with the number of trajectories a long-running proxy has seen. Its next call starts
        again at ordinal 0, which is safe: ``seq`` comes from the database, ordinals only order the
        calls that are open at the same time."""
        with self._ordinals_lock:
            if self._ordinals.get(trajectory_id) == written:
                del self._ordinals[trajectory_id]
                del self._next_to_write[trajectory_id]

    def _take_skipped(self, trajectory_id: str, ordinal: int) -> bool:
        with self._skipped_lock:
            if (trajectory_id, ordinal) in self._skipped:
                self._skipped.remove((trajectory_id, ordinal))
                return True
        return False

    def _write_batch(self, batch: list[CallRecord]) -> None:
        with self._engine.begin() as connection:
            if any(record.resent for record in batch):
                batch = _not_written_yet(connection, batch, self._encoder(connection))
                if not batch:
                    return
            per_trajectory: dict[str, dict[str, Any]] = {}
            for record in batch:
                _add_to_trajectory(per_trajectory, record)
            encoder = self._encoder(connection)
            # The upsert locks the trajectories' rows until commit (see the module docstring).
            _upsert_trajectories(connection, list(per_trajectory.values()), encoder)
            next_seq = _next_seqs(connection, {r.trajectory_id for r in batch if r.seq is not None}, encoder)
            numbered: list[tuple[CallRecord, int]] = []
            for record in batch:
                if record.seq is None:
                    seq = 0
                else:
                    seq = next_seq[record.trajectory_id]
                    next_seq[record.trajectory_id] = seq + 1
                numbered.append((record, seq))
            forms: dict[str, StoredForm] = {}
            judged = self._drift.judge(connection, numbered, forms)
            calls = [
                _call_row(
                    record,
                    seq,
                    forms.get(record.call_id) or whole(record.prompt_token_ids, record.request),
                    encoder,
                )
                for record, seq in numbered
            ]
            completions = [row for record in batch for row in _completion_rows(record, encoder)]
            tagged: dict[str, dict[str, str]] = {}
            for record in batch:
                if record.tags:
                    tagged.setdefault(record.trajectory_id, {}).update(record.tags)
            if tagged:
                merge_tags(connection, tagged)
            _note_weight_versions(connection, batch, encoder)
            if self._call_columns is None:
                self._call_columns = _call_columns(connection)
                self._certificates = inspect(connection).has_table(CERTIFICATES_TABLE)
            if self._certificates:
                _note_certificates(connection, batch, calls, encoder)
            encoder.insert(connection, (LlmCall.__tablename__, self._call_columns), calls)
            encoder.insert(connection, Completion.__table__, completions)  # type: ignore[attr-defined]
            self._count_in(connection, encoder, batch)
        self._drift.remember(judged)  # committed

    def _encoder(self, connection: Any) -> RowEncoder:
        if self._row_encoder is None:
            self._row_encoder = RowEncoder(connection.dialect.name, connection.dialect.paramstyle)
        return self._row_encoder

    # ---- fallback file ----

    def _spill(self, records: list[CallRecord], reason: str) -> None:
        """Put records in the spool (owner-only file), count and log them; when it is full, count them
        as lost."""
        lines = [record_to_line(record, reason) for record in records]
        lost_because = "spool_full"
        try:
            kept = self._spool.append(lines)
        except OSError as exc:
            kept, lost_because = False, f"spool_unwritable:{type(exc).__name__}"
        with self._fallback_lock:
            self.failed += len(records)
            if not kept:
                self.lost += len(records)
            self.failure_reasons[reason if kept else lost_because] += len(records)
        for record in records:
            if record.on_stored is not None:
                record.on_stored(kept)
        with self._progress:
            self._progress.notify_all()
        if kept:
            logger.warning(
                "records=<%d>, reason=<%s>, path=<%s> | records written to the spool",
                len(records),
                reason,
                self._spool.path,
            )
        else:
            logger.error(
                "records=<%d>, reason=<%s>, lost_because=<%s> | records lost",
                len(records),
                reason,
                lost_because,
            )


def _not_written_yet(connection: Any, batch: list[CallRecord], encoder: RowEncoder) -> list[CallRecord]:
    """``batch`` without the records handed over again whose call the database already holds (the
    recorder wrote them, then died before its answer reached the relay) or that came twice in this
    batch (a relay gave up on a stalled recorder that then woke up): each is written once."""
    again = [record.call_id for record in batch if record.resent]
    marks = ", ".join([encoder.mark] * len(again))
    present = set(
        connection.exec_driver_sql(
            f"SELECT id FROM llm_calls_stored WHERE id IN ({marks})", tuple(again)
        ).scalars()
    )
    kept = []
    for record in batch:
        if record.call_id not in present:
            present.add(record.call_id)
            kept.append(record)
    return kept


def _next_seqs(connection: Any, trajectory_ids: set[str], encoder: RowEncoder) -> dict[str, int]:
    """For each trajectory, one past the largest seq the database holds (0 for a new one).

    On SQLite the answer comes back as one JSON row: the sqlite3 module releases the GIL around
    every row it fetches, and with the event loop busy each row then cost up to a switch interval
    (a soak showed this query at 80% of the writer's time once batches held hundreds of
    trajectories). psycopg fetches a result in one go.
    """
    found: dict[str, int] = dict.fromkeys(trajectory_ids, 0)
    ids = sorted(trajectory_ids)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ", ".join([encoder.mark] * len(chunk))
        grouped = (
            f"SELECT trajectory_id, max(seq) AS top FROM llm_calls_stored "
            f"WHERE trajectory_id IN ({marks}) GROUP BY trajectory_id"
        )
        if encoder.sqlite:
            packed = connection.exec_driver_sql(
                f"SELECT json_group_object(trajectory_id, top) FROM ({grouped})", tuple(chunk)
            ).scalar_one()
            rows = jsonio.loads(packed).items() if packed else ()
        else:
            rows = connection.exec_driver_sql(grouped, tuple(chunk)).all()
        for trajectory_id, top in rows:
            found[trajectory_id] = top + 1
    return found


def _describe(error: Exception | None) -> str:
    """The driver's first line of an error, without SQLAlchemy's echo of the statement's values."""
    original = getattr(error, "orig", None) or error
    return str(original).splitlines()[0][:200] if original is not None else ""


def _call_row(record: CallRecord, seq: int, form: StoredForm, encoder: RowEncoder) -> dict[str, Any]:
    latency = None
    if record.finished_at is not None:
        latency = round((record.finished_at - record.received_at) * 1000, 3)
    return {
        "id": record.call_id,
        "trajectory_id": record.trajectory_id,
        "seq": seq,
        "route": record.route,
        "model": record.model,
        "upstream": record.upstream,
        "stream": record.stream,
        "received_at": encoder.time(record.received_at),
        "upstream_first_byte_at": encoder.time(record.upstream_first_byte_at),
        "finished_at": encoder.time(record.finished_at),
        "latency_ms": latency,
        "status_code": record.status_code,
        "outcome": str(record.outcome),
        "integrity": str(record.integrity),
        "error": record.error,
        "response_id": record.response_id,
        "request_rest": None if form.request_rest is None else encoder.json(form.request_rest),
        "prompt_rest_ids": None if form.prompt_rest_ids is None else encoder.json(form.prompt_rest_ids),
        "base_call_id": form.base_call_id,
        "base_choice_index": form.base_choice_index,
        "prompt_shared_tokens": form.prompt_shared_tokens,
        "request_shared_messages": form.request_shared_messages,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "total_tokens": record.total_tokens,
        "weight_version": record.weight_version,
        "weight_versions": None if record.weight_versions is None else encoder.json(record.weight_versions),
        "drift": record.drift,
        "drift_position": record.drift_position,
        "token_in_fallback": record.token_in_fallback,
        "certificate_id": None,  # set by _note_certificates
        "order_wait": record.order_wait,
    }


def _note_weight_versions(connection: Any, batch: list[CallRecord], encoder: RowEncoder) -> None:
    """Add the policy versions of this batch to ``weight_versions`` with when they were first learned
    (their order is what staleness is counted in); a version already there keeps the earlier time."""
    first_seen: dict[str, float] = {}
    for record in batch:
        times = record.version_times or {}
        for version in [record.weight_version, *(s["version"] for s in record.weight_versions or [])]:
            if version is not None:
                at = times.get(version, record.finished_at or record.received_at)
                first_seen[version] = min(first_seen.get(version, at), at)
    if first_seen:
        earlier = "min" if encoder.sqlite else "least"
        rows = [{"version": v, "first_seen_at": encoder.time(at)} for v, at in sorted(first_seen.items())]
        on_conflict = (
            "ON CONFLICT (version) DO UPDATE SET "
            f"first_seen_at = {earlier}(weight_versions.first_seen_at, excluded.first_seen_at)"
        )
        encoder.insert(connection, _WEIGHT_VERSION_INSERT, rows, suffix=on_conflict)


def _call_columns(connection: Any) -> tuple[str, ...]:
    """The columns of ``llm_calls_stored`` both the model and the database have, in the model's order."""
    present = {column["name"] for column in inspect(connection).get_columns("llm_calls_stored")}
    return tuple(c.name for c in LlmCall.__table__.columns if c.name in present)  # type: ignore[attr-defined]


def _note_certificates(
    connection: Any, batch: list[CallRecord], calls: list[dict[str, Any]], encoder: RowEncoder
) -> None:
    """Each call's certificate id on its row, and the batch's certificates in ``certificates``
    (once per distinct value: one already there is left as it is)."""
    rows: dict[str, dict[str, Any]] = {}
    for record, row in zip(batch, calls, strict=True):
        made = certify(record)
        row["certificate_id"] = made.id
        if made.id not in rows:
            rows[made.id] = {
                **{name: getattr(made, name) for name in CERTIFICATE_FIELDS},
                "sampling": encoder.json(made.sampling),
                "first_seen_at": encoder.time(record.received_at),
            }
    if rows:
        encoder.insert(
            connection, _CERTIFICATE_INSERT, list(rows.values()), suffix="ON CONFLICT (id) DO NOTHING"
        )


def _completion_rows(record: CallRecord, encoder: RowEncoder) -> list[dict[str, Any]]:
    return [
        {
            "call_id": record.call_id,
            "choice_index": choice.index,
            "token_ids": encoder.json(choice.token_ids),
            "logprobs": encoder.json(choice.logprobs),
            "finish_reason": choice.finish_reason,
            "stop_reason": None if choice.stop_reason is None else str(choice.stop_reason),
            "message": encoder.json(choice.message),
        }
        for choice in record.choices
    ]


def _add_to_trajectory(per_trajectory: dict[str, dict[str, Any]], record: CallRecord) -> None:
    """Fold one record into its trajectory's row for this batch (times as epoch seconds)."""
    when = record.finished_at or record.received_at
    row = per_trajectory.get(record.trajectory_id)
    if row is None:
        row = {
            "id": record.trajectory_id,
            "created_at": record.received_at,
            "updated_at": when,
            "call_count": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "id_generated": record.seq is None,
            "finished": False,
            "group_id": None,
        }
        per_trajectory[record.trajectory_id] = row
    if record.group_id is not None:
        row["group_id"] = record.group_id
    row["created_at"] = min(row["created_at"], record.received_at)
    row["updated_at"] = max(row["updated_at"], when)
    row["call_count"] += 1
    row["prompt_tokens"] += record.prompt_tokens or 0
    row["completion_tokens"] += record.completion_tokens or 0


def merge_tags(connection: Any, tags_by_trajectory: dict[str, dict[str, str]]) -> None:
    """Add tags to existing trajectories (a key given again takes the new value)."""
    table = Trajectory.__table__  # type: ignore[attr-defined]
    rows = connection.execute(
        select(table.c.id, table.c.tags).where(table.c.id.in_(list(tags_by_trajectory)))
    ).all()
    for trajectory_id, current in rows:
        merged = {**(current or {}), **tags_by_trajectory[trajectory_id]}
        connection.execute(table.update().where(table.c.id == trajectory_id).values(tags=merged))


def _upsert_trajectories(connection: Any, rows: list[dict[str, Any]], encoder: RowEncoder) -> None:
    """Insert new trajectories and add this batch's counts to existing ones (SQLite and PostgreSQL
    share the ``ON CONFLICT`` form; only the name of the larger-of function differs)."""
    latest = "max" if encoder.sqlite else "greatest"
    on_conflict = (
        "ON CONFLICT (id) DO UPDATE SET "
        f"updated_at = {latest}(trajectories.updated_at, excluded.updated_at), "
        "call_count = trajectories.call_count + excluded.call_count, "
        "prompt_tokens = trajectories.prompt_tokens + excluded.prompt_tokens, "
        "completion_tokens = trajectories.completion_tokens + excluded.completion_tokens, "
        "group_id = coalesce(excluded.group_id, trajectories.group_id)"
    )
    for row in rows:
        row["created_at"] = encoder.time(row["created_at"])
        row["updated_at"] = encoder.time(row["updated_at"])
    encoder.insert(connection, _TRAJECTORY_INSERT, rows, suffix=on_conflict)


def _name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` where the kernel shows it (``top -H``, ``ps -L``, py-spy,
    ``/proc/<pid>/task/*/comm``: the first 15 characters), so that its CPU time can be told apart from
    the event loop's. Python names native threads itself only from 3.14 on. Linux only; elsewhere a
    no-op."""
    with contextlib.suppress(OSError):
        Path("/proc/thread-self/comm").write_text(name[:15])
