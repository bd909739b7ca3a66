"""``GET /tokentrail/metrics``: TokenTrail's figures in the Prometheus text format.

Open like ``/tokentrail/health`` (it carries counts, never text or trajectory ids), so a Prometheus
scrape needs no key. Under ``serve --workers N`` the worker that answers reports the sum of all.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from tokentrail.proxy.metrics.exposition import render

router = APIRouter(prefix="/tokentrail", tags=["metrics"])


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Calls, tokens, latencies, the writer, the spool and the upstreams (of all workers)."""
    return Response(render(request.app.state.runtime.metrics_registry), media_type=CONTENT_TYPE_LATEST)
