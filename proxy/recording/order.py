"""Arrival order across writers: a record waits for the record of the reply its history holds.

One writer numbers a trajectory's calls in the order they arrived (``writer.py``). Where several
writers share the database (the ``--workers`` of one host with the recorder thread, or replicas
without sticky routing), a turn can reach another writer before the turn it follows is written: an
agent sends its next call the moment it has the answer, and the writer that has the earlier record
may be gathering a batch, retrying, or paused. Written at once, the later turn would take the lower
``seq`` and the trajectory's training sequence would break at the swap.

A turn's history holds the reply of the turn before it, so the order is in the record itself: a
record whose history holds a model's reply that no recorded call of its trajectory gave waits (at most
``wait_s``) until that call is written, and the trajectory's later records wait behind it. One
that waits in vain (the earlier turn's record was lost, or the history was made up by the client, as
few-shot examples are) is written then, with ``order_wait = "unproven"``, counted in
``tokentrail_record_order_waits_total``.

Only while other writers may be writing (``peers``): a lone writer has every earlier turn it numbered
already, and holding a made-up history would only delay its record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sqlalchemy import Engine

from tokentrail.proxy.recording.records import CallRecord

logger = logging.getLogger(__name__)

POLL_S = 0.05  # how often held records look for what they wait for
PEERS_EVERY_S = 1.0  # how often whether other writers are live is asked again
LOG_EVERY_S = 60.0  # at most one warning this often about records written unproven


class OrderWait:
    """``CallRecord.order_wait``: why a record's ``seq`` came after a wait (``None``: it did not wait)."""

    WAITED = "waited"  # the reply's record was written meanwhile: seq follows it
    UNPROVEN = "unproven"  # it never was, within the bound: seq may be before it


class ReplyJudge(Protocol):
    def awaits_reply(self, connection: Any, record: CallRecord, earlier: Sequence[CallRecord]) -> bool:
        """Whether ``record``'s history holds a reply that no recorded call of its trajectory gave,
        nor ``earlier`` (its trajectory's records about to be written before it)."""


class ReplyOrder:
    """The records held for an earlier turn's record (writer thread only)."""

    def __init__(self, wait_s: float, peers: Callable[[], bool] | None) -> None:
        self._wait_s = wait_s
        self._peers = peers
        self._peers_live = False
        self._peers_asked = float("-inf")
        self._waiting: list[CallRecord] = []
        self._since: dict[str, float] = {}  # call id -> when it first waited (monotonic)
        self._unproven_logged_at = float("-inf")
        self._unproven_unlogged = 0  # written unproven since the last warning

    @property
    def held(self) -> int:
        return len(self._waiting)

    def release(
        self, engine: Engine, judge: ReplyJudge, ready: list[CallRecord], *, flush: bool
    ) -> list[CallRecord]:
        """Of the records held before and ``ready`` (in arrival order), those that may be written
        now; the others stay held. ``flush`` (shutting down) releases everything."""
        records, self._waiting = [*self._waiting, *ready], []
        if flush or not records or not self._others_writing():
            self._since.clear()
            return records
        now = time.monotonic()
        released: list[CallRecord] = []
        earlier: dict[str, list[CallRecord]] = {}  # per trajectory: the records released before
        blocked: set[str] = set()
        try:
            with engine.connect() as connection:
                for record in records:
                    trajectory_id = record.trajectory_id
                    if record.seq is not None and trajectory_id in blocked:
                        self._waiting.append(record)
                        continue
                    mine = earlier.setdefault(trajectory_id, [])
                    if record.seq is not None and judge.awaits_reply(connection, record, mine):
                        since = self._since.setdefault(record.call_id, now)
                        if now - since < self._wait_s:
                            blocked.add(trajectory_id)
                            self._waiting.append(record)
                            continue
                        record.order_wait = OrderWait.UNPROVEN
                        self._log_unproven(trajectory_id, record.call_id, now)
                    elif record.call_id in self._since:
                        record.order_wait = OrderWait.WAITED
                    self._since.pop(record.call_id, None)
                    released.append(record)
                    mine.append(record)
        except Exception as exc:  # the database is unwell: the write will retry or spool them all
            logger.warning("error=<%s> | the order of records was not checked", type(exc).__name__)
            self._waiting.clear()
            self._since.clear()
            return records
        return released

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
        now = time.monotonic()
        if now - self._peers_asked >= PEERS_EVERY_S:
            self._peers_asked = now
            try:
                self._peers_live = self._peers()
            except Exception as exc:  # unknown: assume others write (waiting costs only time)
                logger.warning(
                    "error=<%s> | could not tell whether other writers are live", type(exc).__name__
                )
                self._peers_live = True
        return self._peers_live
