"""Arrival order across writers: a record waits for the record of the reply its history holds.

One writer numbers a trajectory's calls in the order they arrived (``writer.py``). Where several
writers share the database (the ``--workers`` of one host with the recorder thread, or replicas
without sticky routing), a turn can reach another writer before the turn it follows is written: an
agent sends its next call the moment it has the answer, and the writer that has the earlier record
may be gathering a batch, retrying, or paused. Written at once, the later turn would take the lower
``seq`` and the trajectory's training sequence would break at the swap.

A turn's history holds the reply of the turn before it, so the order is in the record itself: a
record whose history holds a reply the client received (an assistant message followed by another)
that no recorded call of its trajectory gave (``DriftJudge.awaits_reply``: no call asked with the
messages before it, none answered with it) waits until that call is written, and the trajectory's
later records wait behind it; each record waits ``wait_s`` at most, counted from when it first had
to. One that waits in vain (the earlier turn's record was lost, or the client made the history up, as
few-shot examples are) is written then. ``llm_calls.order_wait`` says which records waited:
``waited`` or ``unproven``; ``tokentrail_record_order_waits_total`` counts them.

While a trajectory's first held record waits, it is judged again only once the trajectory's largest
``seq`` moved (one grouped read per poll for all held trajectories), not on every poll. A trajectory
none of whose calls gave a reply yet waits ``FIRST_TURN_WAIT_S`` at most: its first call's history may
be made up (few-shot examples), and holding it would also hold token-in's next turns, which read it.

Only while other writers may be writing (``peers``): a lone writer has every earlier turn it numbered
already, and holding a made-up history would only delay its record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from tokentrail.proxy.recording.records import CallRecord

logger = logging.getLogger(__name__)

POLL_S = 0.05  # how often held records look for what they wait for
PEERS_EVERY_S = 1.0  # how often whether other writers are live is asked again
LOG_EVERY_S = 60.0  # at most one warning this often about records written unproven


class OrderWait:
    """``CallRecord.order_wait``: why a record's ``seq`` came after a wait (``None``: it did not wait)."""

    WAITED = "waited"  # the reply's record was written meanwhile: seq follows it
    UNPROVEN = "unproven"  # it never was, within the bound: seq may be before it


class Awaits:
    """What a record waits for (``ReplyJudge.awaits_reply``; ``None``: nothing)."""

    TURN = "turn"  # the call a reply came from, in a trajectory with calls recorded
    # the same in a trajectory none of whose calls gave a reply yet: a made-up history (few-shot
    # examples) looks the same, and waits in vain; so it waits only as long as a working writer lags
    FIRST_TURN = "first_turn"


FIRST_TURN_WAIT_S = 0.5


class ReplyJudge(Protocol):
    def awaits_reply(self, connection: Any, record: CallRecord, earlier: Sequence[CallRecord]) -> str | None:
        """What ``record`` waits for (``Awaits``): its history holds a reply that no recorded call of its
        trajectory gave, nor ``earlier`` (its trajectory's records about to be written before it)."""


Tops = Callable[[Any, set[str]], dict[str, int]]
"""Each trajectory's largest recorded seq (-1 for none), read on the given connection."""


class ReplyOrder:
    """The records held for an earlier turn's record (writer thread only)."""

    def __init__(
        self,
        wait_s: float,
        peers: Callable[[], bool] | None,
        tops: Tops,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._wait_s = wait_s
        self._peers = peers
        self._tops = tops
        self._clock = clock
        self._peers_live = False
        self._peers_asked = float("-inf")
        self._waiting: list[CallRecord] = []
        self._held = 0  # len(_waiting) once a release is done (what the metrics read meanwhile)
        self._since: dict[str, float] = {}  # call id -> when it began to wait (held, or blocked)
        # trajectory -> (its largest seq when its first held record was last judged, what it awaits):
        # judged again only once a writer wrote a call of it (not a read of the trajectory every poll)
        self._judged_at: dict[str, tuple[int, str]] = {}
        self._unproven_logged_at = float("-inf")
        self._unproven_unlogged = 0  # written unproven since the last warning
        self._database_away = False  # (warned once per outage)
        self._misjudged_logged = False

    @property
    def held(self) -> int:
        return self._held

    def release(
        self, engine: Engine, judge: ReplyJudge, ready: list[CallRecord], *, flush: bool
    ) -> list[CallRecord]:
        """Of the records held before and ``ready`` (in arrival order), those that may be written
        now; the others stay held. ``flush`` (shutting down) releases everything."""
        records, self._waiting = [*self._waiting, *ready], []
        if flush or not records or not self._others_writing():
            return self._give_up(records)
        try:
            with engine.connect() as connection:
                released = self._release(connection, judge, records)
        except Exception as exc:  # the database is unwell: the write will retry or spool them all
            self._away(exc, "the order of records was not checked")
            self._waiting = []
            return self._give_up(records)
        self._database_away = False
        self._held = len(self._waiting)
        return released

    def _release(self, connection: Any, judge: ReplyJudge, records: list[CallRecord]) -> list[CallRecord]:
        now = self._clock()
        held_before = {r.trajectory_id for r in records if r.call_id in self._since}
        tops = self._tops(connection, held_before) if held_before else {}
        released: list[CallRecord] = []
        earlier: dict[str, list[CallRecord]] = {}  # per trajectory: the records released before
        blocked: set[str] = set()
        for record in records:
            trajectory_id = record.trajectory_id
            if record.seq is None:
                released.append(record)
                continue
            since = self._since.get(record.call_id, now)
            if trajectory_id in blocked:  # behind an earlier record of its trajectory (its wait counts)
                self._since[record.call_id] = since
                self._waiting.append(record)
                continue
            mine = earlier.setdefault(trajectory_id, [])
            judged = self._judged_at.get(trajectory_id)
            if judged is not None and not mine and tops.get(trajectory_id) == judged[0]:
                awaits: str | None = judged[1]  # nothing was written since: it still awaits the same
            else:
                awaits = self._judge(judge, connection, record, mine)
            if awaits is not None:
                bound = self._wait_s if awaits == Awaits.TURN else min(self._wait_s, FIRST_TURN_WAIT_S)
                if now - since < bound:
                    self._since[record.call_id] = since
                    blocked.add(trajectory_id)
                    self._waiting.append(record)
                    if not mine and trajectory_id in tops:  # (read before it was judged: no race)
                        self._judged_at[trajectory_id] = (tops[trajectory_id], awaits)
                    continue
                record.order_wait = OrderWait.UNPROVEN
                self._log_unproven(trajectory_id, record.call_id, now)
            elif record.call_id in self._since:
                record.order_wait = OrderWait.WAITED
            self._since.pop(record.call_id, None)
            released.append(record)
            mine.append(record)
        for trajectory_id in set(self._judged_at) - blocked:
            del self._judged_at[trajectory_id]
        return released

    def _judge(
        self, judge: ReplyJudge, connection: Any, record: CallRecord, earlier: list[CallRecord]
    ) -> str | None:
        """``judge.awaits_reply``; a record it cannot judge (a trajectory whose stored form is broken)
        waits for nothing, and the others are judged on."""
        try:
            return judge.awaits_reply(connection, record, earlier)
        except SQLAlchemyError:
            raise  # the database: the whole batch goes the normal way (release)
        except Exception as exc:
            if not self._misjudged_logged:
                logger.warning(
                    "call_id=<%s>, error=<%s> | could not tell what a record waits for: it waits for nothing",
                    record.call_id,
                    type(exc).__name__,
                )
                self._misjudged_logged = True
            return None

    def _give_up(self, records: list[CallRecord]) -> list[CallRecord]:
        """All of ``records``, those that were held marked unproven (shutting down, the database
        unwell, or no other writer any more)."""
        for record in records:
            if record.call_id in self._since:
                record.order_wait = OrderWait.UNPROVEN
        self._since.clear()
        self._judged_at.clear()
        self._held = 0
        return records

    def _log_unproven(self, trajectory_id: str, call_id: str, now: float) -> None:
        """One warning with the call, then at most one a minute with how many more: a client that
        makes histories up (few-shot examples) makes one per trajectory."""
        self._unproven_unlogged += 1
        if now - self._unproven_logged_at < LOG_EVERY_S:
            return
        logger.warning(
            "trajectory=<%s>, call_id=<%s>, records=<%d> | the call whose reply a history holds was not "
            "recorded within TOKENTRAIL_ORDER_WAIT_S: written anyway, seq may come before it (made-up "
            "histories, such as few-shot examples, always wait this long: see the README)",
            trajectory_id,
            call_id,
            self._unproven_unlogged,
        )
        self._unproven_logged_at = now
        self._unproven_unlogged = 0

    def _others_writing(self) -> bool:
        if self._peers is None:
            return False
        now = self._clock()
        if now - self._peers_asked >= PEERS_EVERY_S:
            self._peers_asked = now
            try:
                self._peers_live = self._peers()
            except Exception as exc:  # unknown: assume others write (waiting costs only time)
                self._away(exc, "could not tell whether other writers are live")
                self._peers_live = True
        return self._peers_live

    def _away(self, exc: Exception, what: str) -> None:
        """The database failed a read: one warning per outage (the next release that works ends it)."""
        if not self._database_away:
            logger.warning("error=<%s> | %s", type(exc).__name__, what)
            self._database_away = True
