"""The relay's side of the socket: hands each call's record to the host's recorder and keeps it until
the recorder says it is safe.

The relay pays for a record one C call (``frames.encode_record``) and a buffered socket write; the
prompt IDs go as the bytes vLLM sent. Every record handed over stays here, unacknowledged, until the
recorder answers that it is committed (or in the recorder's own spool). So nothing is lost when the
recorder dies: the link connects again (the keeper starts a new recorder) and hands over every
unacknowledged record again, marked as such; the recorder writes each one whose call the database
does not hold yet, so nothing is written twice either.

Records go to this relay's own spool file instead, counted with a reason, when the recorder cannot
take them: more than ``max_unacked`` wait (it is slow), or it has been unreachable for ``wait_s``
(every record waiting then goes too). The spool is handed over, marked as sent again, once the
recorder answers again. Durable mode (``CallRecord.on_stored``) answers the client only when its
record is acknowledged or spooled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from tokentrail.proxy.recorder.frames import (
    ACKS,
    ARRIVED,
    RECORD_AGAIN,
    SKIPPED,
    FrameReader,
    Pieces,
    decode_acks,
    encode_record,
    frame,
    record_kind,
)
from tokentrail.proxy.recording.records import GOOD_INTEGRITY, CallRecord
from tokentrail.proxy.recording.spool import Spool, record_to_line

logger = logging.getLogger(__name__)

_RECONNECT_S = (0.02, 0.05, 0.1, 0.2, 0.5)
FLUSH_S = 0.002
FLUSH_BYTES = 256 * 1024


@dataclass(slots=True)
class _Waiting:
    """A record handed over (or to be), not yet acknowledged."""

    payload: Pieces
    record: CallRecord | None  # None: a line replayed from the spool
    raw: bool = False  # the payload carries the answer unread (frames.RAW_RECORD)
    again: bool = False


def _arrival(call_id: str, trajectory_id: str) -> Pieces:
    return frame(ARRIVED, f"{call_id}\t{trajectory_id}".encode())


class _Connection(asyncio.Protocol):
    def __init__(self, link: RecorderLink) -> None:
        self.link = link
        self.reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not subclasses)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except ValueError:
            assert self.transport is not None
            self.transport.close()
            return
        for kind, payload in frames:
            if kind == ACKS:
                self.link.acknowledged(decode_acks(payload))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class RecorderLink:
    """A ``RecordSink`` (``recording/writer.py``) whose writer is the recorder process."""

    def __init__(
        self,
        socket_path: Path,
        spool_path: Path,
        *,
        max_unacked: int,
        wait_s: float,
        spool_max_bytes: int = 2**30,
        reject_when_spool_full: bool = False,
    ) -> None:
        self.socket_path = socket_path
        self.max_unacked = max_unacked
        self.wait_s = wait_s
        self._spool = Spool(spool_path, spool_max_bytes)
        self._reject_when_spool_full = reject_when_spool_full
        self._waiting: dict[str, _Waiting] = {}
        # calls of named trajectories that arrived and whose records are not acknowledged yet, in
        # arrival order: told to every recorder this link connects to, before their records
        self._arrived: dict[str, str] = {}
        self._connected = asyncio.Event()
        self._connection: _Connection | None = None
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_at: asyncio.TimerHandle | None = None
        self._last_ack = 0.0  # (loop time) when the recorder last acknowledged anything
        self._keeper: asyncio.Task[None] | None = None
        self._replay: asyncio.Task[None] | None = None
        self._replaying: set[str] = set()  # call_ids of spooled records handed over, not acknowledged
        self._replayed_all = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self.connects = 0
        self._progress = threading.Condition()  # (wait_settled: tests and tools, from other threads)
        # the figures health and metrics show, as RecordWriter has them (for what this relay handed over)
        self.submitted = 0
        self.written = 0
        self.failed = 0
        self.lost = 0
        self.replayed = 0
        self.refused = 0
        self.failure_reasons: Counter[str] = Counter()
        self.integrity_problems = 0
        self.integrity_counts: Counter[str] = Counter()

    # ---- RecordSink ----

    def arrive(self, call_id: str, trajectory_id: str) -> int:
        self._arrived[call_id] = trajectory_id
        self._send(_arrival(call_id, trajectory_id))
        return 0  # (the recorder numbers it; a named trajectory's record carries a seq, any seq)

    def submit(self, record: CallRecord) -> None:
        self.submitted += 1
        if len(self._waiting) >= self.max_unacked:
            self._spill([record], "recorder_slow")
            return
        raw, payload = encode_record(record)
        if not self._waiting:
            self._last_ack = asyncio.get_running_loop().time()  # (the wait for an answer starts now)
        waiting = _Waiting(payload, record, raw)
        self._waiting[record.call_id] = waiting
        self._idle.clear()
        self._send(frame(record_kind(raw, again=False), *payload), now=True)

    @property
    def reads_answers(self) -> bool:
        """The recorder reads vLLM's answers: the relay may pass them on unread."""
        return True

    @property
    def accepting(self) -> bool:
        return not (self._reject_when_spool_full and self._spool.full)

    @property
    def spool(self) -> Spool:
        return self._spool

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def held(self) -> int | None:
        """Not known here: the recorder's writer holds records for an earlier turn's (``order.py``)."""
        return None

    @property
    def connected(self) -> bool:
        return self._connection is not None

    # ---- the connection ----

    def _send(self, pieces: Pieces, *, now: bool = False) -> None:
        """Queue ``pieces``. Arrivals wait at most ``FLUSH_S`` (or until ``FLUSH_BYTES`` wait) and go
        out together; a record goes out at once (``now``), with every arrival queued before it, so
        the recorder has a call's arrival and record before its client has the answer's last bytes,
        and so before the client can send the call after it, to any worker."""
        if self._connection is None:
            return  # handed over (records) when connected; an arrival alone is not needed
        self._out.extend(pieces)
        self._out_bytes += sum(map(len, pieces))
        if now or self._out_bytes >= FLUSH_BYTES:
            self._flush()
        elif self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(FLUSH_S, self._flush)

    def _flush(self) -> None:
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        out, self._out, self._out_bytes = self._out, [], 0
        connection = self._connection
        if out and connection is not None and connection.transport is not None:
            connection.transport.writelines(out)

    async def start(self, wait_s: float = 10.0) -> None:
        """Connect, and wait (at most ``wait_s``) for the recorder to answer: a proxy that starts
        with its recorder hands over its first records at once."""
        self._keeper = asyncio.create_task(self._keep_connected())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), wait_s)

    async def _keep_connected(self) -> None:
        """Connect, hand over what waits, stay until the connection is lost; again, forever."""
        loop = asyncio.get_running_loop()
        attempt = 0
        down_since = loop.time()
        while not self._closing:
            try:
                _transport, connection = await loop.create_unix_connection(
                    lambda: _Connection(self), str(self.socket_path)
                )
            except OSError:
                if loop.time() - down_since > self.wait_s and self._waiting:
                    self._spill_waiting("recorder_unreachable")
                await asyncio.sleep(_RECONNECT_S[min(attempt, len(_RECONNECT_S) - 1)])
                attempt += 1
                continue
            attempt = 0
            self.connects += 1
            if self.connects > 1:
                logger.warning("waiting=<%d> | reconnected to the recorder", len(self._waiting))
            self._connection = connection
            self._connected.set()
            self._last_ack = loop.time()  # (a new recorder gets its own wait_s to answer)
            for call_id, trajectory_id in self._arrived.items():  # (in arrival order)
                self._send(_arrival(call_id, trajectory_id))
            for waiting in self._waiting.values():  # all of them again: any may have been lost
                waiting.again = waiting.again or self.connects > 1
                self._send(frame(record_kind(waiting.raw, waiting.again), *waiting.payload))
            self._maybe_replay()
            await self._while_answering(connection)
            self._connection = None
            self._connected.clear()
            self._out.clear()
            for waiting in self._waiting.values():
                waiting.again = True
            if self._replay is not None:
                self._replay.cancel()
                self._replay = None
            down_since = loop.time()
            if not self._closing:
                logger.error("waiting=<%d> | lost the recorder; reconnecting", len(self._waiting))

    async def _while_answering(self, connection: _Connection) -> None:
        """Until the connection is lost; or, when records wait and the recorder has acknowledged
        nothing for ``wait_s`` (stopped, hung: alive enough to accept a connection, not to answer),
        until this link spools what waits and drops the connection."""
        loop = asyncio.get_running_loop()
        while not connection.lost.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(connection.lost), self.wait_s / 4)
            if self._waiting and loop.time() - self._last_ack > self.wait_s and not connection.lost.done():
                logger.error(
                    "waiting=<%d>, wait_s=<%s> | the recorder stopped answering; records go to the spool",
                    len(self._waiting),
                    self.wait_s,
                )
                self._spill_waiting("recorder_unresponsive")
                if connection.transport is not None:
                    connection.transport.abort()
                await connection.lost

    def acknowledged(self, acks: list[tuple[str, bool, str]]) -> None:
        self._last_ack = asyncio.get_running_loop().time()
        for call_id, ok, integrity in acks:
            self._arrived.pop(call_id, None)
            waiting = self._waiting.pop(call_id, None)
            if waiting is None:
                continue
            if self._replaying:
                self._replaying.discard(call_id)
                if not self._replaying:
                    self._replayed_all.set()
            record = waiting.record
            if ok:
                if record is None:
                    self.replayed += 1
                else:
                    self.written += 1
                    self.integrity_counts[integrity] += 1
                    if integrity not in GOOD_INTEGRITY:
                        self.integrity_problems += 1
            else:
                self.failed += 1
                self.lost += 1
                self.failure_reasons["recorder_lost"] += 1
            if record is not None and record.on_stored is not None:
                record.on_stored(ok)
        if not self._waiting:
            self._idle.set()
        self._maybe_replay()
        self._notify()

    def _notify(self) -> None:
        with self._progress:
            self._progress.notify_all()

    def wait_settled(self, count: int, timeout: float) -> bool:
        """Block until ``count`` records in all were acknowledged or spilled (for tests and tools)."""
        with self._progress:
            return self._progress.wait_for(lambda: self.written + self.failed >= count, timeout)

    # ---- the spool ----

    def _maybe_replay(self) -> None:
        """Start handing the spool over when it holds records, the recorder is there and has room."""
        if (
            self._spool.pending
            and self._replay is None
            and self._connection is not None
            and len(self._waiting) < self.max_unacked // 2
        ):
            self._replay = asyncio.get_running_loop().create_task(self._replay_spool())

    def _spill_waiting(self, reason: str) -> None:
        if self._replay is not None:  # its lines stay in their file, handed over next time
            self._replay.cancel()
            self._replay = None
        records = [w.record for w in self._waiting.values() if w.record is not None]
        self._waiting.clear()
        self._replaying.clear()
        self._idle.set()
        self._spill(records, reason)

    def _spill(self, records: list[CallRecord], reason: str) -> None:
        if not records:
            return
        for record in records:
            # its arrival was numbered: the recorder must not hold its trajectory's later calls for it
            if self._arrived.pop(record.call_id, None) is not None:
                self._send(frame(SKIPPED, record.call_id.encode()))
        self._flush()
        lines = [record_to_line(record, reason) for record in records]
        lost_because = "spool_full"
        try:
            kept = self._spool.append(lines)
        except OSError as exc:
            kept, lost_because = False, f"spool_unwritable:{type(exc).__name__}"
        self.failed += len(records)
        if not kept:
            self.lost += len(records)
        self.failure_reasons[reason if kept else lost_because] += len(records)
        for record in records:
            if record.on_stored is not None:
                record.on_stored(kept)
        self._notify()
        log = logger.warning if kept else logger.error
        log(
            "records=<%d>, reason=<%s>, kept=<%s> | records written to the relay's spool",
            len(records),
            reason,
            kept,
        )

    async def _replay_spool(self) -> None:
        """Hand the spool's records to the recorder as sent again, a bounded number at a time; the
        file goes once every one of them is acknowledged (a break leaves it for the next time)."""
        try:
            path = self._spool.take()
            if path is None:
                return
            chunk = max(1, self.max_unacked // 2)
            count = 0
            for record, _reason, line in Spool.read(path):
                if record is None:
                    self.lost += 1
                    self.failure_reasons["spool_line_cut"] += 1
                    continue
                if record.call_id in self._waiting:
                    continue
                waiting = _Waiting((line.encode(),), None, again=True)
                self._waiting[record.call_id] = waiting
                self._replaying.add(record.call_id)
                self._replayed_all.clear()
                self._idle.clear()
                self._send(frame(RECORD_AGAIN, *waiting.payload))
                count += 1
                if count % chunk == 0:
                    await self._replayed_all.wait()
            if self._replaying:
                await self._replayed_all.wait()
            self._spool.done(path)
            logger.warning("records=<%d> | the relay's spooled records were handed to the recorder", count)
        finally:
            self._replay = None

    # ---- shutdown ----

    async def close(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until the recorder acknowledged every record; spool the rest."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        self._closing = True
        if self._waiting:
            self._spill_waiting("recorder_unreachable")
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        connection = self._connection
        if connection is not None and connection.transport is not None:
            self._flush()
            connection.transport.close()
