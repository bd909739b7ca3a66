"""The ``RecordWriter`` as TokenTrail runs it, made in one place for the two places it runs: the
recorder process (``main.py``) and, with ``TOKENTRAIL_RECORDER=thread``, the proxy itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine

from tokentrail.proxy.fleet.replicas import ControlStore, others_live
from tokentrail.proxy.metrics import persisted
from tokentrail.proxy.recording.writer import GATHER_S, RecordWriter
from tokentrail.proxy.settings import Settings
from tokentrail.proxy.trajectory.drift import DriftJudge


def make_writer(settings: Settings, engine: Engine, fallback_path: Path) -> RecordWriter:
    """A writer that judges drift, stores calls against their base and adds each batch's metric
    counts (under this proxy's instance name) in the batch's own transaction."""
    instance = settings.instance_name
    return RecordWriter(
        engine,
        queue_size=settings.writer_queue_size,
        batch_size=settings.writer_batch_size,
        retries=settings.writer_retries,
        fallback_path=fallback_path,
        # Durable calls wait for their commit: write what is queued at once (records that arrive
        # meanwhile form the next batch) instead of gathering for a moment first.
        gather_s=0.0 if settings.durable else GATHER_S,
        spool_max_bytes=settings.spool_max_bytes,
        reject_when_spool_full=settings.spool_full == "reject",
        count=lambda connection, encoder, batch: persisted.add_counts(
            connection, encoder, instance, persisted.batch_counts(batch)
        ),
        judge=DriftJudge(),
        order_wait_s=order_wait_s(settings),
        peers=other_writers(settings, engine),
    )


def order_wait_s(settings: Settings) -> float:
    """How long a record waits for an earlier turn's (``recording/order.py``). The recorder process
    acknowledges a record once it is written: held as long as a relay's patience
    (``TOKENTRAIL_RECORDER_WAIT_S``), it would be spooled as if the recorder had hung."""
    if settings.recorder == "process":
        return min(settings.order_wait_s, settings.recorder_wait_s / 2)
    return settings.order_wait_s


def other_writers(settings: Settings, engine: Engine) -> Callable[[], bool] | None:
    """Whether other writers may be writing this database now (``recording/order.py``): always for
    the workers' writer threads of one host; else while another replica is live in the fleet. Never
    with ``TOKENTRAIL_DURABLE``: every call is written before its answer goes, so no turn can reach a
    writer before the turn it follows is written (and holding would hold the answer)."""
    if settings.durable or not settings.order_wait_s:  # (0: told that nothing needs it)
        return None
    if settings.workers > 1 and settings.recorder == "thread":
        return lambda: True
    if settings.fleet_control_in_database:
        store = ControlStore(engine)
        return lambda: others_live(store)
    return None
