"""The recorder's side of the socket: records in from the relays, acknowledgements out.

Each relay connection is one ``_RelayConnection``. It reads frames (``frames.py``), numbers arrivals
with the writer's ordinals (the order they reach this process is the host's arrival order), decodes
records on this process's event loop (reading the answers the relays passed on unread) and queues
them for the ``RecordWriter``, whose thread does the rest of what the relay no longer does: parses
the prompt IDs, judges drift, builds the stored form and the certificate, commits, counts the
metrics. When the writer has a record safe (committed, or in this process's spool) its
acknowledgement goes back on the connection, batched per turn of the event loop.

A relay that disconnects with calls arrived but not recorded has died (a live relay drains before it
closes): those ordinals are skipped, so that its trajectories' later calls are not held for them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import cast

from tokentrail.proxy.recorder.frames import (
    ARRIVED,
    RECORD_KINDS,
    SKIPPED,
    FrameReader,
    decode_record,
    encode_acks,
)
from tokentrail.proxy.recording.writer import RecordWriter

logger = logging.getLogger(__name__)


class _RelayConnection(asyncio.Protocol):
    def __init__(self, service: RecorderService) -> None:
        self.service = service
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader()
        self.arrived: dict[str, tuple[str, int]] = {}  # call_id -> (trajectory, ordinal), no record yet
        self.acks: list[tuple[str, bool, str]] = []  # filled by the writer thread
        self.acks_lock = threading.Lock()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not subclasses)
        self.service.connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except ValueError as exc:
            logger.error("error=<%s> | a relay sent what is not a frame; connection closed", exc)
            assert self.transport is not None
            self.transport.close()
            return
        writer = self.service.writer
        for kind, payload in frames:
            if kind == ARRIVED:
                call_id, _, trajectory_id = payload.decode().partition("\t")
                self.arrived[call_id] = (trajectory_id, writer.next_ordinal(trajectory_id))
            elif kind in RECORD_KINDS:
                raw, again = RECORD_KINDS[kind]
                self._record(payload, raw=raw, again=again)
            elif kind == SKIPPED:
                skipped = self.arrived.pop(payload.decode(), None)
                if skipped is not None:
                    writer.skip(*skipped)

    def _record(self, payload: bytes, *, raw: bool, again: bool) -> None:
        try:
            record = decode_record(payload, raw=raw)
        except Exception as exc:  # a bug: this record only (its relay keeps it until it stops)
            logger.error("error=<%s> | a relay sent a record that could not be read", type(exc).__name__)
            return
        record.resent = again
        arrival = self.arrived.pop(record.call_id, None)
        if record.seq is not None:  # a named trajectory: numbered in arrival order
            record.seq = (
                arrival[1] if arrival is not None else self.service.writer.next_ordinal(record.trajectory_id)
            )
        call_id = record.call_id

        def stored(ok: bool) -> None:  # called from the writer thread, once per record of a batch
            with self.acks_lock:
                first = not self.acks
                self.acks.append((call_id, ok, record.integrity))
            if first:  # one wake-up of the event loop per batch, not per record
                self.loop.call_soon_threadsafe(self.send_acks)

        record.on_stored = stored
        self.service.writer.submit(record)

    def send_acks(self) -> None:
        with self.acks_lock:
            acks, self.acks = self.acks, []
        if acks and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(encode_acks(acks))

    def connection_lost(self, exc: Exception | None) -> None:
        self.service.connections.discard(self)
        for trajectory_id, ordinal in self.arrived.values():
            self.service.writer.skip(trajectory_id, ordinal)
        if self.arrived:
            logger.warning(
                "calls=<%d> | a relay went away with calls that never sent their records", len(self.arrived)
            )
        self.arrived.clear()
        self.service.changed()


class RecorderService:
    """The Unix-socket server in front of one ``RecordWriter``."""

    def __init__(self, writer: RecordWriter, path: Path) -> None:
        self.writer = writer
        self.path = path
        self.connections: set[_RelayConnection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._changed = asyncio.Event()

    def changed(self) -> None:
        self._changed.set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # a socket file a killed recorder left behind
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: _RelayConnection(self), str(self.path)
        )
        self.path.chmod(0o600)

    async def stop(self, grace_s: float) -> None:
        """Take no new relays; give the connected ones ``grace_s`` to hand over their last records
        and go (they drain their calls first), then stop the writer after it wrote everything."""
        if self._server is not None:
            self._server.close()
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.connections and asyncio.get_running_loop().time() < deadline:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                break
        # The writer's last acknowledgements were queued on this loop before the thread's result
        # was: they have run when this resumes.
        await asyncio.to_thread(self.writer.close)
        for connection in list(self.connections):
            connection.send_acks()
            if connection.transport is not None:
                connection.transport.close()
        self.path.unlink(missing_ok=True)
