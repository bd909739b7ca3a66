"""Pause and resume through TokenTrail: new recorded calls wait at the proxy while training updates
the weights, instead of failing or reaching a paused vLLM.

Why at the proxy as well as at vLLM (``POST /pause``): a trainer pauses the whole fleet in one place,
agents see a slow answer rather than an error, and a call held longer than
``TOKENTRAIL_PAUSE_MAX_WAIT_S`` gets a 503 with ``Retry-After`` instead of hanging forever.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass


class PauseMode(enum.StrEnum):
    """vLLM's pause modes (``POST /pause?mode=``)."""

    WAIT = "wait"  # in-flight requests finish; the pause returns when they have
    KEEP = "keep"  # in-flight requests are frozen in vLLM until resume
    ABORT = "abort"  # in-flight requests are aborted (recorded with outcome ``aborted``)


@dataclass
class PauseState:
    paused: bool
    mode: PauseMode | None
    paused_for_s: float | None
    held_now: int
    held_total: int
    longest_wait_s: float
    timed_out: int


class PauseGate:
    """Open unless paused; recorded calls pass it before they are sent upstream."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self.mode: PauseMode | None = None
        self._since: float | None = None
        self.held_now = 0
        self.held_total = 0
        self.longest_wait_s = 0.0
        self.timed_out = 0

    @property
    def paused(self) -> bool:
        return not self._open.is_set()

    def pause(self, mode: PauseMode) -> None:
        if not self.paused:
            self._since = time.monotonic()
        self.mode = mode
        self._open.clear()

    def resume(self) -> None:
        self.mode = None
        self._since = None
        self._open.set()

    async def wait(self, max_wait_s: float) -> bool:
        """True once open (at once when it is); False after ``max_wait_s`` still paused."""
        if self._open.is_set():
            return True
        started = time.monotonic()
        self.held_now += 1
        self.held_total += 1
        try:
            await asyncio.wait_for(self._open.wait(), max_wait_s)
            return True
        except TimeoutError:
            self.timed_out += 1
            return False
        finally:
            self.held_now -= 1
            self.longest_wait_s = max(self.longest_wait_s, time.monotonic() - started)

    def state(self) -> PauseState:
        since = None if self._since is None else time.monotonic() - self._since
        return PauseState(
            self.paused, self.mode, since, self.held_now, self.held_total, self.longest_wait_s, self.timed_out
        )
