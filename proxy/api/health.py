"""``GET /tokentrail/health``: is the proxy up, and is the writer keeping up with the traffic.

Under ``serve --workers N`` a connection reaches one worker, but a monitor must see them all (a record
lost in worker 3 must not hide behind worker 0's "ok"). Each worker therefore writes its own figures to
``<its spool>.health.json`` every second, and the one that answers adds its siblings' latest reports to
its own (``worker_state``): the top-level figures are sums, ``workers`` lists each one, and a worker whose
report is missing or older than ``STALE_S`` makes the status ``degraded``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, ValidationError

from tokentrail.proxy.server.worker_state import STALE_S, sibling_states, state_path, write_state

logger = logging.getLogger(__name__)

KIND = "health"

router = APIRouter(prefix="/tokentrail", tags=["health"])


class WriterHealth(BaseModel):
    """The background writer's state since the proxy started."""

    queue_depth: int = Field(description="Records waiting to be written.")
    queue_capacity: int = Field(description="Records the queue holds before spilling to the file.")
    records_written: int = Field(description="Records committed to the database.")
    records_failed: int = Field(
        description="Records the database did not take at first (spooled, or lost if the spool was full)."
    )
    records_replayed: int = Field(description="Spooled records written to the database later.")
    records_lost: int = Field(description="Records the full spool could not take (see failure_reasons).")
    records_refused: int = Field(
        description="Records the database refused on their own: kept in '<spool>.refused', not replayed."
    )
    spool_bytes: int = Field(description="Bytes of records waiting in the spool for the database.")
    spool_full: bool = Field(description="Whether the spool reached TOKENTRAIL_SPOOL_MAX_BYTES.")
    failure_reasons: dict[str, int] = Field(description="records_failed by reason.")
    fallback_path: str = Field(description="The spool: records waiting for the database, as JSON lines.")
    integrity_problems: int = Field(
        description="Written records whose token IDs disagree with vLLM's counts."
    )
    integrity: dict[str, int] = Field(description="Written records by integrity value.")


class RecorderHealth(BaseModel):
    """With ``TOKENTRAIL_RECORDER=process``: this proxy process's link to the host's recorder."""

    connected: bool = Field(description="Whether the recorder is connected now (records go to it).")
    connects: int = Field(
        description="Connections made since this process started: more than 1, the recorder was restarted."
    )


class UpstreamHealth(BaseModel):
    url: str
    healthy: bool
    in_flight: int


class WorkerSummary(BaseModel):
    """One worker's figures under ``serve --workers``."""

    worker: int
    status: str = Field(description="The worker's own status, or 'not_reporting' (no report for 5 s).")
    in_flight: int
    records_written: int
    records_failed: int
    records_lost: int
    report_age_s: float | None = Field(
        description="Seconds since the worker wrote these figures (0: the one answering; null: never)."
    )


class Health(BaseModel):
    """The proxy's health."""

    status: str = Field(
        description=(
            "'ok', or 'degraded' while records wait in the spool, after any was lost or refused, or while "
            "the recorder process is not connected."
        )
    )
    upstream: str
    upstreams: list[UpstreamHealth]
    in_flight: int = Field(description="Calls being relayed now.")
    worker: int | None = Field(
        None,
        description="Under 'serve --workers N': which worker (0 to N-1) answered.",
    )
    writer: WriterHealth
    recorder: RecorderHealth | None = Field(
        None,
        description="With TOKENTRAIL_RECORDER=process: the link to the recorder, as this process sees it.",
    )
    workers: list[WorkerSummary] | None = Field(
        None,
        description=(
            "Under 'serve --workers N': every worker; the figures above are then their sums (each "
            "worker's counts start at its own start, so a restarted worker's begin again at 0)."
        ),
    )


@router.get("/health", response_model=Health)
def health(request: Request) -> Any:
    """Writer queue depth and counts of records written and failed (of all workers)."""
    runtime = request.app.state.runtime
    own = own_health(runtime)
    if runtime.worker is None:
        return own
    return combined(own, _sibling_reports(runtime))


def own_health(runtime: Any) -> Health:
    """This process's figures."""
    writer = runtime.writer
    recorder = None
    if runtime.settings.recorder == "process":
        recorder = RecorderHealth(connected=writer.connected, connects=writer.connects)
    degraded = writer.spool.pending or writer.lost or writer.refused or (recorder and not recorder.connected)
    return Health(
        status="degraded" if degraded else "ok",
        recorder=recorder,
        upstream=runtime.settings.upstream,
        upstreams=[
            UpstreamHealth(url=u.url, healthy=u.healthy, in_flight=u.in_flight)
            for u in runtime.relay.balancer.upstreams
        ],
        in_flight=runtime.relay.in_flight.count,
        worker=runtime.worker,
        writer=WriterHealth(
            queue_depth=writer.queue_depth,
            queue_capacity=runtime.settings.writer_queue_size,
            records_written=writer.written,
            records_failed=writer.failed,
            records_replayed=writer.replayed,
            records_lost=writer.lost,
            records_refused=writer.refused,
            spool_bytes=writer.spool.bytes,
            spool_full=writer.spool.full,
            failure_reasons=dict(writer.failure_reasons),
            fallback_path=str(runtime.writer.spool.path),
            integrity_problems=writer.integrity_problems,
            integrity=dict(writer.integrity_counts),
        ),
    )


def publish(runtime: Any) -> None:
    """Write this worker's figures for its siblings."""
    write_state(state_path(runtime.writer.spool.path, KIND), own_health(runtime).model_dump_json())


def _sibling_reports(runtime: Any) -> list[tuple[int, Health | None, float]]:
    """(worker, its last report or None, the report's age) for every other worker."""
    reports: list[tuple[int, Health | None, float]] = []
    for slot, content, age in sibling_states(runtime, KIND):
        report: Health | None = None
        if content is not None and age <= STALE_S:
            with contextlib.suppress(ValidationError):
                report = Health.model_validate_json(content)
        reports.append((slot, report, age))
    return reports


def combined(own: Health, others: list[tuple[int, Health | None, float]]) -> Health:
    """``own`` plus the siblings' reports: sums, every worker listed, degraded if any is."""
    assert own.worker is not None
    summaries = [_summary(own.worker, own, 0.0)]
    writer = own.writer.model_copy(deep=True)
    in_flight = own.in_flight
    degraded = own.status != "ok"
    for slot, report, age in others:
        summaries.append(_summary(slot, report, age))
        if report is None:
            degraded = True
            continue
        degraded = degraded or report.status != "ok"
        in_flight += report.in_flight
        _add_writer(writer, report.writer)
    summaries.sort(key=lambda summary: summary.worker)
    return own.model_copy(
        update={
            "status": "degraded" if degraded else "ok",
            "in_flight": in_flight,
            "writer": writer,
            "workers": summaries,
        }
    )


_SUMMED = (
    "queue_depth",
    "queue_capacity",
    "records_written",
    "records_failed",
    "records_replayed",
    "records_lost",
    "records_refused",
    "spool_bytes",
    "integrity_problems",
)


def _add_writer(total: WriterHealth, other: WriterHealth) -> None:
    for name in _SUMMED:
        setattr(total, name, getattr(total, name) + getattr(other, name))
    total.spool_full = total.spool_full or other.spool_full
    for counts, more in ((total.failure_reasons, other.failure_reasons), (total.integrity, other.integrity)):
        for key, value in more.items():
            counts[key] = counts.get(key, 0) + value


def _summary(slot: int, report: Health | None, age: float) -> WorkerSummary:
    if report is None:
        return WorkerSummary(
            worker=slot,
            status="not_reporting",
            in_flight=0,
            records_written=0,
            records_failed=0,
            records_lost=0,
            report_age_s=None if age == float("inf") else round(age, 3),
        )
    return WorkerSummary(
        worker=slot,
        status=report.status,
        in_flight=report.in_flight,
        records_written=report.writer.records_written,
        records_failed=report.writer.records_failed,
        records_lost=report.writer.records_lost,
        report_age_s=round(age, 3),
    )
