"""One process's metric values, and the sum of several workers' (``serve --workers``).

Two kinds of figure:

* Counts of recorded calls (calls, tokens, token-in fallbacks, latency histograms, records written)
  are read from the database (``persisted``): the writer adds them in the transaction that writes
  the records, so they never go down when a worker dies and every worker answers the same.
* Everything else is this process's own (the writer's queue and spool, calls in flight, upstreams).
  Each worker publishes its figures beside its health report (``worker_state``); the one answering a
  scrape adds its siblings' files to its own. Counters add up; so do gauges, except ``upstream_up``,
  which is the minimum (down if any worker sees the upstream down). A sibling's file older than
  ``STALE_S`` still gives its counters (they only grow, and dropping them would look like a counter
  reset) but not its gauges (a stopped worker has no queue and no calls in flight).
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from tokentrail.proxy.metrics import catalog, persisted
from tokentrail.proxy.metrics.calls import Values, label_key
from tokentrail.proxy.metrics.catalog import Combine, Kind
from tokentrail.proxy.server.worker_state import STALE_S, sibling_states, state_path, write_state

logger = logging.getLogger(__name__)

KIND = "metrics"


def process_values(runtime: Any) -> Values:
    """This process's own figures: the writer's, spool's and upstreams' state now."""
    values: Values = {}
    writer = runtime.writer
    for metric, number in (
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
    held = writer.held
    if held is not None:  # None: the recorder process holds them, and does not say
        values[catalog.RECORDS_HELD.name] = {label_key(): float(held)}
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
    """What a scrape answers: the database's counts of this instance's calls, this process's own
    figures, plus its siblings' under ``--workers``."""
    total = process_values(runtime)
    if runtime.worker is not None:
        for _slot, content, age in sibling_states(runtime, KIND):
            if content is None:
                continue
            with contextlib.suppress(ValueError):
                add(total, json.loads(content), gauges=age <= STALE_S)
    try:
        counted = persisted.read_counts(runtime.engine, runtime.settings.instance_name)
        runtime.last_counts = counted
        stale = 0.0
    except SQLAlchemyError as exc:  # the database is down: the last counts read, and say they are old
        logger.warning("error=<%s> | metric counts not read; the last ones are served", type(exc).__name__)
        counted = runtime.last_counts or {}
        stale = 1.0
    total[catalog.COUNTS_STALE.name] = {label_key(): stale}
    total.update(counted)
    calls = counted.get(catalog.CALLS.name, {})
    written = sum(v for v in calls.values() if isinstance(v, float))
    total[catalog.RECORDS_WRITTEN.name] = {label_key(): written}
    return total


def add(total: Values, other: Values, *, gauges: bool) -> None:
    """Fold ``other`` into ``total`` (see the module docstring for how each kind combines)."""
    for metric in catalog.ALL:
        series = other.get(metric.name)
        if metric.name in persisted.PERSISTED_NAMES or metric.name == catalog.RECORDS_WRITTEN.name:
            continue  # the database's counts, never a process's
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
