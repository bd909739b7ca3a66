"""``TOKENTRAIL_RETENTION_DAYS``: finished trajectories older than that are pruned in the background.

Why: teams keep a step's rollouts only for a while once they are trained on (or archived); a
database that is never pruned only grows. The job runs in its own thread, at start and then every
``RETENTION_EVERY_S``, with ``prune`` itself: the same short batches, so recording goes on beside
it. Only finished trajectories are taken (an open one may still get calls), by the time of their
first call, whole. Under ``serve --workers`` only the first worker runs it.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from tokentrail.proxy.storage.prune import DEFAULT_BATCH, PruneSelection, PruneSummary, prune

logger = logging.getLogger(__name__)

RETENTION_EVERY_S = 600.0
THREAD_NAME = "tokentrail-retention"


class Retention:
    """The background job and its figures (read by the metrics)."""

    def __init__(
        self, engine: Engine, days: float, *, every_s: float = RETENTION_EVERY_S, batch: int = DEFAULT_BATCH
    ) -> None:
        self._engine = engine
        self.days = days
        self._every_s = every_s
        self._batch = batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self.trajectories = 0  # pruned since start
        self.calls = 0
        self.runs = 0  # runs that ended (stopped early by shutdown included)
        self.failures = 0  # runs a database error ended
        self.last_run_at = 0.0  # epoch seconds when the last run ended (0: none yet)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the current batch."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self._every_s)

    def run_once(self) -> PruneSummary | None:
        """One pass over what is due now; None when the database failed (counted and logged)."""
        cutoff = datetime.now(UTC) - timedelta(days=self.days)
        counted = PruneSummary()

        def count(summary: PruneSummary) -> None:  # after each batch: the metrics move as it goes
            self.trajectories += summary.trajectories - counted.trajectories
            self.calls += summary.calls - counted.calls
            counted.trajectories, counted.calls = summary.trajectories, summary.calls

        try:
            summary = prune(
                self._engine,
                PruneSelection(before=cutoff, finished=True),
                batch=self._batch,
                measure=False,
                stop=self._stop,
                progress=count,
            )
        except Exception as exc:  # a database error: try again at the next run, never stop the proxy
            self.failures += 1
            logger.warning("error=<%s> | retention run failed; trying again later", type(exc).__name__)
            return None
        finally:
            self.runs += 1
            self.last_run_at = time.time()
        if summary.trajectories:
            logger.info(
                "trajectories=<%d>, calls=<%d>, seconds=<%.1f> | retention pruned trajectories older than %s",
                summary.trajectories,
                summary.calls,
                summary.seconds,
                cutoff.isoformat(timespec="seconds"),
            )
        return summary
