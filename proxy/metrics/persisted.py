"""Counts committed with the records they count, one set per TokenTrail instance.

Why: counters held in a process's memory go down when that process dies or restarts. Under
``serve --workers N`` the port is one scrape target while workers come and go behind it, so a killed
worker made ``tokentrail_calls_total`` fall (60 to 37 in one measured run) and end below what the
database held (49 against 72). Here the writer adds each batch's counts to ``metric_counts`` in the
transaction that writes the batch, and a scrape reads them back: they never go down, they equal what
the database holds from this instance whatever was killed, and every worker answers the same.

An instance is one ``tokentrail serve`` (all its workers): ``TOKENTRAIL_INSTANCE``, by default the
host name and port. Replicas keep their own counts, so Prometheus sums them as before. Rows are
upserted in sorted order, so two replicas' transactions on PostgreSQL always lock them in the same
order (no deadlock).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from tokentrail.proxy.metrics.calls import OBSERVED, CallCounters, Values
from tokentrail.proxy.recording.records import CallRecord
from tokentrail.proxy.storage.bulk import RowEncoder

PERSISTED_NAMES = frozenset(metric.name for metric in OBSERVED)
_BUCKET = "\x1e"  # between a histogram series' labels and its bucket's index (the last is the sum)
_INSERT = ("metric_counts", ("instance", "metric", "labels", "value"))
_ADD = "ON CONFLICT (instance, metric, labels) DO UPDATE SET value = metric_counts.value + excluded.value"


def batch_counts(records: Iterable[CallRecord]) -> dict[tuple[str, str], float]:
    """What ``records`` add to each persisted series: (metric, labels) -> amount (zeros left out)."""
    counters = CallCounters()
    for record in records:
        counters.observe(record)
    counts: dict[tuple[str, str], float] = {}
    for name, series in counters.values().items():
        for key, value in series.items():
            if isinstance(value, list):
                for index, amount in enumerate(value):
                    if amount:
                        counts[(name, f"{key}{_BUCKET}{index}")] = amount
            elif value:
                counts[(name, key)] = value
    return counts


def add_counts(
    connection: Any, encoder: RowEncoder, instance: str, counts: dict[tuple[str, str], float]
) -> None:
    """Add ``counts`` to the instance's rows, inside the caller's transaction."""
    rows = [
        {"instance": instance, "metric": metric, "labels": labels, "value": value}
        for (metric, labels), value in sorted(counts.items())
    ]
    encoder.insert(connection, _INSERT, rows, suffix=_ADD)


def read_counts(engine: Engine, instance: str) -> Values:
    """The instance's persisted series, in the form ``CallCounters.values`` gives."""
    values: Values = {name: {} for name in PERSISTED_NAMES}
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT metric, labels, value FROM metric_counts WHERE instance = :instance"),
            {"instance": instance},
        ).all()
    sizes = {metric.name: len(metric.buckets) + 2 for metric in OBSERVED if metric.buckets}
    for metric, labels, value in rows:
        series = values.setdefault(metric, {})
        if metric not in sizes:
            series[labels] = float(value)
            continue
        key, _, index = labels.rpartition(_BUCKET)
        buckets = series.get(key)
        if not isinstance(buckets, list):
            buckets = series[key] = [0.0] * sizes[metric]
        if index.isdigit() and int(index) < len(buckets):
            buckets[int(index)] = float(value)
    return values
