"""One process's metric values, and the sum of several workers' (``serve --workers``).

Each worker publishes its values beside its health report (``worker_state``); the one answering a
scrape adds its siblings' files to its own. Counters and histogram buckets add up; so do gauges,
except ``upstream_up``, which is the minimum (down if any worker sees the upstream down). A sibling's
file older than ``STALE_S`` still gives its counters (they only grow, and dropping them would look like
a counter reset) but not its gauges (a stopped worker has no queue and no calls in flight).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from tokentrail.proxy.api.worker_state import STALE_S, sibling_states, state_path, write_state
from tokentrail.proxy.metrics import catalog
from tokentrail.proxy.metrics.calls import Values, label_key
from tokentrail.proxy.metrics.catalog import Combine, Kind

KIND = "metrics"


def process_values(runtime: Any) -> Values:
    """This process's figures: the counted calls plus the writer's, spool's and upstreams' state now."""
    values: Values = runtime.call_counters.values()
    writer = runtime.writer
    for metric, number in (
        (catalog.RECORDS_WRITTEN, writer.written),
        (catalog.RECORDS_SPOOLED, writer.failed),
        (catalog.RECORDS_REPLAYED, writer.replayed),
        (catalog.RECORDS_LOST, writer.lost),
        (catalog.RECORDS_REFUSED, writer.refused),
        (catalog.QUEUE_DEPTH, writer.queue_depth),
        (catalog.QUEUE_CAPACITY, runtime.settings.writer_queue_size),
        (catalog.SPOOL_BYTES, writer.spool.bytes),
        (catalog.IN_FLIGHT, runtime.relay.in_flight.count),
        (catalog.WORKERS_REPORTING, 1),
        *_retention_values(runtime.retention),
    ):
        values[metric.name] = {label_key(): float(number)}
    upstreams = runtime.relay.balancer.upstreams
    values[catalog.UPSTREAM_UP.name] = {u.url: 1.0 if u.healthy else 0.0 for u in upstreams}
    values[catalog.UPSTREAM_IN_FLIGHT.name] = {u.url: float(u.in_flight) for u in upstreams}
    return values


def _retention_values(retention: Any) -> list[tuple[catalog.Metric, float]]:
    """The retention job's figures (zeros when it is off, or runs in another worker)."""
    figures = (0, 0, 0, 0, 0.0)
    if retention is not None:
        figures = (
            retention.trajectories,
            retention.calls,
            retention.runs,
            retention.failures,
            retention.last_run_at,
        )
    metrics = (
        catalog.RETENTION_TRAJECTORIES,
        catalog.RETENTION_CALLS,
        catalog.RETENTION_RUNS,
        catalog.RETENTION_FAILURES,
        catalog.RETENTION_LAST_RUN,
    )
    return list(zip(metrics, figures, strict=True))


def publish(runtime: Any) -> None:
    """Write this worker's figures for its siblings."""
    write_state(state_path(runtime.writer.spool.path, KIND), json.dumps(process_values(runtime)))


def all_values(runtime: Any) -> Values:
    """What a scrape answers: this process's figures, plus its siblings' under ``--workers``."""
    total = process_values(runtime)
    if runtime.worker is None:
        return total
    for _slot, content, age in sibling_states(runtime, KIND):
        if content is None:
            continue
        with contextlib.suppress(ValueError):
            add(total, json.loads(content), gauges=age <= STALE_S)
    return total


def add(total: Values, other: Values, *, gauges: bool) -> None:
    """Fold ``other`` into ``total`` (see the module docstring for how each kind combines)."""
    for metric in catalog.ALL:
        series = other.get(metric.name)
        if not isinstance(series, dict) or (metric.kind is Kind.GAUGE and not gauges):
            continue
        into = total.setdefault(metric.name, {})
        for key, value in series.items():
            mine = into.get(key)
            if isinstance(value, list):
                same = isinstance(mine, list) and len(mine) == len(value)
                into[key] = [a + b for a, b in zip(mine, value, strict=True)] if same else value  # type: ignore[arg-type]
            elif mine is None:
                into[key] = value
            elif metric.combine is Combine.MIN:
                into[key] = min(float(mine), value)  # type: ignore[arg-type]
            else:
                into[key] = float(mine) + value  # type: ignore[arg-type]
