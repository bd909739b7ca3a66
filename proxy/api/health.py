"""``GET /tokentrail/health``: is the proxy up, and is the writer keeping up with the traffic."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

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


class UpstreamHealth(BaseModel):
    url: str
    healthy: bool
    in_flight: int


class Health(BaseModel):
    """The proxy's health."""

    status: str = Field(
        description="'ok', or 'degraded' while records wait in the spool, or after any was lost or refused."
    )
    upstream: str
    upstreams: list[UpstreamHealth]
    in_flight: int = Field(description="Calls being relayed now.")
    worker: int | None = Field(
        None,
        description="Under 'serve --workers N': which worker (0 to N-1) answered; the figures are its own.",
    )
    writer: WriterHealth


@router.get("/health", response_model=Health)
def health(request: Request) -> Any:
    """Writer queue depth and counts of records written and failed."""
    runtime = request.app.state.runtime
    writer = runtime.writer
    return Health(
        status="degraded" if writer.spool.pending or writer.lost or writer.refused else "ok",
        upstream=runtime.settings.upstream,
        upstreams=[
            UpstreamHealth(url=u.url, healthy=u.healthy, in_flight=u.in_flight)
            for u in runtime.relay.pool.upstreams
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
            fallback_path=str(runtime.settings.fallback_path),
            integrity_problems=writer.integrity_problems,
            integrity=dict(writer.integrity_counts),
        ),
    )
