"""Pause, resume and policy versions for every replica on one database: a control row they all apply.

Why: a host's control plane (``rl/control.py``: one ``serve``, or its ``--workers`` supervisor) decides
for that host only. Replicas on one PostgreSQL each had their own, so a pause through one replica let
the others' calls go on to a paused vLLM, a resume through another left the first one's calls held,
and a version set through one replica was unknown to the others.

How: each replica's control plane gets ``ReplicaFleet`` as its ``Sequencer`` and ``Members``.

* **State.** ``fleet_control`` (one row, migration 0010) holds the latest request's generation, the
  pause mode (null: running) and every upstream's version, with a revision that every change raises.
  A replica that acts writes it; every replica applies it to its own gates and versions and
  acknowledges the revision it applied in its ``fleet_replicas`` row, with a heartbeat (the
  database's clock, so the hosts' clocks do not matter). PostgreSQL's ``NOTIFY`` wakes every replica
  at each change and acknowledgement; without it (SQLite) each reads the row every ``POLL_S``. The
  acting replica waits for every live replica's acknowledgement before it answers (a replica silent
  for ``LEASE_S`` is dead and left out; one that does not acknowledge within ``ACK_TIMEOUT_S`` is
  logged and left out), so a held call never outlives a resume, and every replica knows a new
  version before its next call is sent.
* **Order.** A pause or resume takes the next generation from the row; the acting one holds the fleet
  lock (PostgreSQL: an advisory lock; SQLite, whose replicas share one host: a file lock) while it
  checks it is still the latest and acts on vLLM and the row, so the last request wins everywhere.
  A replica whose wait pause is draining sees a newer generation in the row and gives way.
* **Drain.** A wait pause waits for every live replica to report no call running at its generation.
* **Start.** A replica applies the row before it serves: one started during a pause holds its calls.

Cost: nothing on the call path (the gates are in memory); per replica, in the background, a read of
the row and a heartbeat every second (PostgreSQL) or a read every ``POLL_S`` (SQLite); per pause or
resume a few milliseconds on PostgreSQL (``bench/fleet_control.py``). Needs session-level features of
PostgreSQL (an advisory lock, LISTEN): not through a transaction-pooling pgbouncer.

The database being away makes a pause or resume fail with ``FleetUnavailableError`` (503): the
gates stay as they are, and calls go on as the fleet last decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import SQLAlchemyError

from tokentrail.proxy import jsonio
from tokentrail.proxy.rl.control import (
    CONTROL_TIMEOUT_S,
    ControlPlane,
    FleetUnavailableError,
    Members,
    Versions,
)
from tokentrail.proxy.rl.pause import PauseMode
from tokentrail.proxy.storage.engine import sqlite_path

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

POLL_S = 0.05  # how often the row is read where no notification wakes a replica (SQLite)
QUIET_POLL_S = 1.0  # how often it is read anyway on PostgreSQL, where NOTIFY wakes every replica
HEARTBEAT_S = 1.0  # a replica writes its heartbeat at least this often
LEASE_S = 10.0  # a replica whose heartbeat is older is dead: nobody waits for it
FORGET_S = 600.0  # a dead replica's row is deleted after this long
ACK_TIMEOUT_S = 30.0  # a live replica that applied nothing in this long is left out, and logged
LISTEN_RETRY_S = 2.0  # a lost listening connection is made again after this long
CHANNEL = "tokentrail_fleet"  # PostgreSQL's NOTIFY channel: "the control row or an acknowledgement changed"
_LOCK_KEY = 0x546F6B54  # PostgreSQL advisory lock key: "TokT"


@dataclass(frozen=True, slots=True)
class FleetRow:
    generation: int
    revision: int
    paused: PauseMode | None
    versions: Versions


@dataclass(frozen=True, slots=True)
class ReplicaRow:
    replica: str
    seen_revision: int
    drained_generation: int
    silent_s: float  # since its last heartbeat, by the database's clock

    def live(self, lease_s: float = LEASE_S) -> bool:
        """Whether it beat within its lease (a replica silent longer is dead: nobody waits for it)."""
        return self.silent_s <= lease_s


class _Keep:
    """``publish``'s default: leave the pause state as it is."""


_KEEP = _Keep()


def others_live(store: ControlStore) -> bool:
    """Whether more than one replica is live (one of them may be the asker): blocking."""
    try:
        return sum(1 for row in store.replicas() if row.live()) > 1
    except SQLAlchemyError:
        if not store.has_tables():  # a database not migrated to 0010 yet: no fleet
            return False
        raise


class ControlStore:
    """The control row and the replicas' rows (blocking: called in threads)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        path = sqlite_path(str(engine.url))
        self._lock_path = None if path is None else path.with_name(path.name + ".fleet-lock")
        self.notifies = engine.dialect.name == "postgresql"
        # the database's clock, in seconds since the epoch
        self._now = (
            "EXTRACT(EPOCH FROM clock_timestamp())"
            if self.notifies
            else "((julianday('now') - 2440587.5) * 86400.0)"
        )

    def has_tables(self) -> bool:
        """Whether the schema has the fleet's tables (migration 0010)."""
        with self.engine.connect() as connection:
            return bool(inspect(connection).has_table("fleet_control"))

    def libpq_dsn(self) -> str:
        """The database's address for a plain psycopg connection (the listener)."""
        return self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def read(self) -> FleetRow:
        with self.engine.connect() as connection:
            return self._row(connection)

    def replicas(self) -> list[ReplicaRow]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT replica, seen_revision, drained_generation, "
                    f"{self._now} - heartbeat_at FROM fleet_replicas"
                )
            )
            return [ReplicaRow(str(r[0]), int(r[1]), int(r[2]), float(r[3])) for r in rows]

    def next_generation(self) -> int:
        with self.engine.begin() as connection:
            connection.execute(text("UPDATE fleet_control SET generation = generation + 1 WHERE id = 1"))
            self._notify(connection)
            return self._row(connection).generation

    def publish(self, paused: PauseMode | _Keep | None = _KEEP, versions: Versions | None = None) -> FleetRow:
        """Write a change (the pause state, and versions merged into the row's): the row as written."""
        with self.engine.begin() as connection:
            # the write first: it takes the row's lock, so the merge below reads the latest versions
            connection.execute(text("UPDATE fleet_control SET revision = revision + 1 WHERE id = 1"))
            row = self._row(connection)
            merged = {**row.versions, **(versions or {})}
            state = row.paused if isinstance(paused, _Keep) else paused
            connection.execute(
                text("UPDATE fleet_control SET paused = :paused, versions = :versions WHERE id = 1"),
                {"paused": None if state is None else str(state), "versions": jsonio.dumps_text(merged)},
            )
            self._notify(connection)
            return FleetRow(row.generation, row.revision, state, merged)

    def report(self, replica: str, seen_revision: int, drained_generation: int, *, notify: bool) -> None:
        """This replica's acknowledgement and heartbeat (``notify``: it acknowledges something); the
        rows of replicas silent for ``FORGET_S`` go."""
        values = {"replica": replica, "seen": seen_revision, "drained": drained_generation}
        with self.engine.begin() as connection:
            updated = connection.execute(
                text(
                    "UPDATE fleet_replicas SET seen_revision = :seen, drained_generation = :drained, "
                    f"heartbeat_at = {self._now} WHERE replica = :replica"
                ),
                values,
            )
            if updated.rowcount == 0:
                connection.execute(
                    text(
                        "INSERT INTO fleet_replicas (replica, seen_revision, drained_generation, "
                        f"heartbeat_at) VALUES (:replica, :seen, :drained, {self._now})"
                    ),
                    values,
                )
                connection.execute(
                    text(f"DELETE FROM fleet_replicas WHERE heartbeat_at < {self._now} - :forget"),
                    {"forget": FORGET_S},
                )
            if notify:
                self._notify(connection)

    def leave(self, replica: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(text("DELETE FROM fleet_replicas WHERE replica = :r"), {"r": replica})

    def try_lock(self) -> Any:
        """The fleet lock if it is free (a handle for ``unlock``), else None."""
        if self._lock_path is not None:
            descriptor = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                return None
            return descriptor
        connection = self.engine.connect()
        try:
            taken = connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK_KEY}).scalar()
            connection.commit()
        except BaseException:
            connection.invalidate()  # it may hold the lock: its session must end, not go back to the pool
            connection.close()
            raise
        if not taken:
            connection.close()
            return None
        return connection

    def unlock(self, handle: Any) -> None:
        if isinstance(handle, int):
            os.close(handle)  # (closing the descriptor releases its flock)
            return
        connection: Connection = handle
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
            connection.commit()
        except BaseException:
            connection.invalidate()  # never back to the pool holding the lock: its session ends
            raise
        finally:
            connection.close()

    def _notify(self, connection: Connection) -> None:
        if self.notifies:  # delivered at commit
            connection.execute(text(f"NOTIFY {CHANNEL}"))

    @staticmethod
    def _row(connection: Connection) -> FleetRow:
        row = connection.execute(
            text("SELECT generation, revision, paused, versions FROM fleet_control WHERE id = 1")
        ).one()
        versions = jsonio.loads(row[3]) if row[3] else {}
        return FleetRow(int(row[0]), int(row[1]), None if row[2] is None else PauseMode(row[2]), versions)


class ReplicaFleet:
    """A host's control plane, made one of the replicas on a database (its ``Sequencer`` and
    ``Members``); this host's own members (``inner``) do what the fleet's row says."""

    def __init__(
        self,
        plane: ControlPlane,
        store: ControlStore,
        *,
        poll_s: float = POLL_S,
        lease_s: float = LEASE_S,
        ack_timeout_s: float = ACK_TIMEOUT_S,
    ) -> None:
        self.plane = plane
        self.store = store
        self.inner: Members = plane.members
        self.replica = uuid.uuid4().hex
        self.poll_s = poll_s
        self.lease_s = lease_s
        self.ack_timeout_s = ack_timeout_s
        self.applied = -1  # the revision of the row this host applied
        self._acting = 0  # the generation of this host's request that holds the fleet's turn
        self._closed: PauseMode | None = None  # the gates' state as this host last set it
        self._drained = 0  # the generation at which this host last had no call running while paused
        self._draining: tuple[int, asyncio.Task[None]] | None = None
        self._reported = (-1, -1)  # (revision, drained generation) last written
        self._changed = asyncio.Event()  # set (and replaced) on every notification
        self._listening = False
        self._database_away = False
        self._applying = asyncio.Lock()
        self._local_turn = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle ----

    async def start(self) -> bool:
        """Apply the fleet's state (before this host serves a call), join, and watch for changes.

        False, and this host decides alone, when the database has no fleet tables (its schema is
        older than migration 0010, which ``serve`` applies at start unless told not to). A database
        that cannot be reached now is read again by the watcher until it answers."""
        try:
            if not await asyncio.to_thread(self.store.has_tables):
                logger.error(
                    "the database has no fleet control row (migration 0010): this host decides alone"
                )
                return False
        except SQLAlchemyError as exc:
            logger.error("error=<%s> | the fleet's state is not known yet: read again", type(exc).__name__)
        self.plane.members = self
        self.plane.sequencer = self
        with contextlib.suppress(SQLAlchemyError):
            await self._apply(await asyncio.to_thread(self.store.read))
            await self._report()
        self._tasks.append(asyncio.create_task(self._watch(), name="tokentrail-fleet-watch"))
        self._tasks.append(asyncio.create_task(self._beat(), name="tokentrail-fleet-heartbeat"))
        if self.store.notifies:
            self._tasks.append(asyncio.create_task(self._listen(), name="tokentrail-fleet-listen"))
        logger.info("replica=<%s> | pause, resume and versions shared over the database", self.replica)
        return True

    async def stop(self) -> None:
        tasks = list(self._tasks)
        if self._draining is not None:
            tasks.append(self._draining[1])
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # shutting down: nothing of this may stop the writer's drain
                logger.warning("error=<%s> | a fleet task failed", type(exc).__name__)
        if self._tasks:
            with contextlib.suppress(SQLAlchemyError, OSError):
                await asyncio.to_thread(self.store.leave, self.replica)

    # ---- the sequencer ----

    async def next(self) -> int:
        return await self._database(self.store.next_generation)

    async def latest(self) -> int:
        return (await self._database(self.store.read)).generation

    @contextlib.asynccontextmanager
    async def turn(self, generation: int) -> AsyncIterator[None]:
        async with self._local_turn:
            handle = await self._fleet_lock()
            self._acting = generation
            try:
                yield
            finally:
                self._acting = 0
                await self._unlock_quietly(handle)

    async def _fleet_lock(self) -> Any:
        """The fleet lock's handle, once no other replica holds it (``FleetUnavailableError`` after
        ``CONTROL_TIMEOUT_S``). Cancelled meanwhile, a lock taken in the thread is let go as soon as
        the thread returns it."""
        deadline = time.monotonic() + CONTROL_TIMEOUT_S
        while True:
            taking = asyncio.ensure_future(self._database(self.store.try_lock))
            try:
                handle = await asyncio.shield(taking)
            except asyncio.CancelledError:
                taking.add_done_callback(self._unlock_late)
                raise
            if handle is not None:
                return handle
            if time.monotonic() >= deadline:
                raise FleetUnavailableError("another replica has held the fleet lock too long")
            await asyncio.sleep(self.poll_s)  # another replica acts: no event says when it is done

    def _unlock_late(self, taking: asyncio.Future[Any]) -> None:
        if not taking.cancelled() and taking.exception() is None and taking.result() is not None:
            self._tasks.append(asyncio.ensure_future(self._unlock_quietly(taking.result())))

    async def _unlock_quietly(self, handle: Any) -> None:
        try:
            await asyncio.to_thread(self.store.unlock, handle)
        except (SQLAlchemyError, OSError) as exc:  # (a session that ends lets its lock go anyway)
            logger.warning("error=<%s> | the fleet lock was not let go", type(exc).__name__)

    # ---- the members: this host's, then every other replica's acknowledgement ----

    def newer(self) -> None:
        self.inner.newer()

    async def close(self, mode: PauseMode) -> None:
        row = await self._publish_and_apply(mode, None)
        await self._acknowledged(row.revision)

    async def drain(self) -> bool:
        """This host's calls, then every live replica's, finished under this pause; False when a
        newer request came (here or at any replica)."""
        generation = self._acting
        mine = asyncio.ensure_future(self.inner.drain())
        try:
            while True:
                changed = self._changed
                if (await self._database(self.store.read)).generation != generation:
                    return False
                if mine.done():
                    if not mine.result():
                        return False
                    replicas = await self._database(self.store.replicas)
                    if all(r.drained_generation >= generation for r in self._others(replicas)):
                        return True
                    await self._until_changed(changed)
                else:
                    notified = asyncio.ensure_future(changed.wait())
                    try:
                        await asyncio.wait([mine, notified], timeout=self._interval)
                    finally:
                        notified.cancel()
        finally:
            mine.cancel()

    async def open(self, versions: Versions) -> None:
        # the row's versions are the fleet's: the resume published what it learned, and a version
        # another replica set meanwhile must not be written over with this host's older one
        row = await self._publish_and_apply(None, None)
        await self._acknowledged(row.revision)

    async def set_versions(self, versions: Versions) -> None:
        try:
            row = await self._publish_and_apply(_KEEP, versions)
        except FleetUnavailableError:
            await self.inner.set_versions(versions)  # this host stamps what it knows meanwhile
            raise
        await self._acknowledged(row.revision)

    async def _publish_and_apply(
        self, paused: PauseMode | _Keep | None, versions: Versions | None
    ) -> FleetRow:
        async with self._applying:
            row = await self._database(lambda: self.store.publish(paused, versions))
            await self._take(row)
        return row

    async def _acknowledged(self, revision: int) -> None:
        """Until every other live replica applied ``revision`` (or ``ack_timeout_s``)."""
        deadline = time.monotonic() + self.ack_timeout_s
        while True:
            changed = self._changed
            replicas = await self._database(self.store.replicas)
            behind = [r.replica for r in self._others(replicas) if r.seen_revision < revision]
            if not behind:
                return
            if time.monotonic() >= deadline:
                logger.error(
                    "replicas=<%s>, revision=<%d> | replicas did not apply a fleet change in time",
                    ",".join(behind),
                    revision,
                )
                return
            await self._until_changed(changed)

    def _others(self, replicas: list[ReplicaRow]) -> list[ReplicaRow]:
        return [r for r in replicas if r.replica != self.replica and r.live(self.lease_s)]

    async def _database(self, work: Callable[[], _T]) -> _T:
        """``work`` in a thread; the database being away is ``FleetUnavailableError`` (a 503)."""
        try:
            return await asyncio.to_thread(work)
        except (SQLAlchemyError, OSError) as exc:  # (OSError: the lock file next to a SQLite one)
            raise FleetUnavailableError(f"the replicas' database: {type(exc).__name__}") from exc

    # ---- noticing changes ----

    @property
    def _interval(self) -> float:
        """How long to wait for a notification before reading again anyway."""
        return QUIET_POLL_S if self._listening else self.poll_s

    async def _until_changed(self, changed: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), self._interval)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _listen(self) -> None:
        """PostgreSQL: wake the waiting loops on every NOTIFY (a change, an acknowledgement)."""
        import psycopg  # (PostgreSQL installs only)

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.store.libpq_dsn(), autocommit=True
                ) as connection:
                    await connection.execute(f"LISTEN {CHANNEL}")
                    self._listening = True
                    self._wake()  # whatever changed while nobody listened
                    async for _ in connection.notifies():
                        self._wake()
            except (psycopg.Error, OSError) as exc:
                logger.warning(
                    "error=<%s> | fleet notifications lost: reading every %s s",
                    type(exc).__name__,
                    self.poll_s,
                )
            finally:
                self._listening = False
            await asyncio.sleep(LISTEN_RETRY_S)

    # ---- applying the row ----

    async def _watch(self) -> None:
        while True:
            changed = self._changed
            try:
                await self._apply(await asyncio.to_thread(self.store.read))
                await self._report()
                if self._database_away:
                    self._database_away = False
                    logger.warning("the fleet's database answers again")
            except Exception as exc:  # the database is away: the gates stay as they are
                if not self._database_away:
                    self._database_away = True
                    logger.error("error=<%s> | the fleet's database is away", type(exc).__name__)
            await self._until_changed(changed)

    async def _apply(self, row: FleetRow) -> None:
        """Take ``row`` unless this host applied it or a later one already. (A newer request at
        another replica needs no word here: this host's wait pause reads the generation as it
        drains, and gives way.)"""
        async with self._applying:
            if row.revision > self.applied:
                await self._take(row)

    async def _take(self, row: FleetRow) -> None:
        """Make this host's members and the plane's state what ``row`` says."""
        state = self.plane.state
        state.versions.update(row.versions)
        state.paused = row.paused
        if row.paused != self._closed:
            if row.paused is None:
                await self.inner.open(dict(row.versions))
            else:
                await self.inner.set_versions(dict(row.versions))
                await self.inner.close(row.paused)
        else:
            await self.inner.set_versions(dict(row.versions))
        self._closed = row.paused
        self.applied = max(self.applied, row.revision)
        if row.paused is None:
            if self._draining is not None:
                self._draining[1].cancel()
                self._draining = None
        elif self._drained < row.generation:
            self._drain_for(row.generation)

    def _drain_for(self, generation: int) -> None:
        """Report once this host has no call running under the pause of ``generation``."""
        if self._draining is not None:
            if self._draining[0] == generation:
                return
            self._draining[1].cancel()

        async def drain() -> None:
            if await self.inner.drain():
                self._drained = max(self._drained, generation)
                with contextlib.suppress(SQLAlchemyError):
                    await self._report()

        self._draining = (generation, asyncio.create_task(drain()))

    async def _report(self, *, beat: bool = False) -> None:
        """Acknowledge what changed (and notify), or with ``beat`` write the heartbeat anyway."""
        news = (self.applied, self._drained) != self._reported
        if not news and not beat:
            return
        await asyncio.to_thread(self.store.report, self.replica, self.applied, self._drained, notify=news)
        self._reported = (self.applied, self._drained)

    async def _beat(self) -> None:
        """The heartbeat, every ``HEARTBEAT_S``, on its own: applying a change can wait on a hung
        worker for longer than the lease, and this replica is alive all the same."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            with contextlib.suppress(SQLAlchemyError, OSError):  # (the watcher says the database is away)
                await self._report(beat=True)
