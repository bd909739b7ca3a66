"""Counting finished calls from their records, on the writer thread.

The relay hands each record to the writer once; the writer thread calls ``CallCounters.observe`` as it
takes the record off its queue, so the request path pays nothing for metrics. (A record that finds the
queue full is observed where it is spilled, on the event loop: the lock below makes the two safe.)
"""

from __future__ import annotations

import bisect
import threading

from tokentrail.proxy.metrics import catalog
from tokentrail.proxy.metrics.catalog import Metric
from tokentrail.proxy.recording.records import CallRecord

# One process's figures: metric name -> label values (joined by LABEL_SEP) -> a number, or for a
# histogram the count of each bucket (not cumulative; the last is +Inf) followed by the sum.
Values = dict[str, dict[str, float | list[float]]]
LABEL_SEP = "\x1f"

OBSERVED = (
    catalog.CALLS,
    catalog.PROMPT_TOKENS,
    catalog.GENERATED_TOKENS,
    catalog.TOKEN_IN_FALLBACKS,
    catalog.TOKEN_IN_RENDERS,
    catalog.RECORD_ORDER_WAITS,
    catalog.ADDED_LATENCY,
    catalog.FIRST_TOKEN,
    catalog.DURATION,
)


def label_key(*values: str) -> str:
    return LABEL_SEP.join(values)


def added_latency(record: CallRecord) -> float | None:
    """The proxy's own time: the call's total minus the time the upstream had it, when the relay noted
    when it sent the request and when the upstream's last byte came (``None`` otherwise)."""
    sent = record.upstream_sent_at
    done = record.upstream_last_byte_at
    if sent is None or done is None or record.finished_at is None:
        return None
    return max(0.0, (record.finished_at - record.received_at) - (done - sent))


class CallCounters:
    """Counters and histograms of the calls this process recorded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: Values = {metric.name: {} for metric in OBSERVED}

    def observe(self, record: CallRecord) -> None:
        route = record.route
        self._add(catalog.CALLS, label_key(route, str(record.outcome), str(record.integrity)), 1)
        self._add(catalog.PROMPT_TOKENS, route, record.prompt_tokens or 0)
        self._add(catalog.GENERATED_TOKENS, route, record.completion_tokens or 0)
        # token-in (a later change) sets the reason a call was sent as text after all
        reason = getattr(record, "token_in_fallback", None)
        if reason:
            self._add(catalog.TOKEN_IN_FALLBACKS, str(reason), 1)
        how = record.token_in_render
        if how and record.token_in:
            self._add(catalog.TOKEN_IN_RENDERS, how, 1)
        if record.order_wait:
            self._add(catalog.RECORD_ORDER_WAITS, record.order_wait, 1)
        if record.upstream_first_byte_at is not None:
            self._observe(catalog.FIRST_TOKEN, route, record.upstream_first_byte_at - record.received_at)
        if record.finished_at is not None:
            self._observe(catalog.DURATION, route, record.finished_at - record.received_at)
        added = added_latency(record)
        if added is not None:
            self._observe(catalog.ADDED_LATENCY, route, added)

    def values(self) -> Values:
        """A copy of the figures so far (safe to read while the writer thread counts on)."""
        with self._lock:
            return {
                name: {key: list(v) if isinstance(v, list) else v for key, v in series.items()}
                for name, series in self._values.items()
            }

    def _add(self, metric: Metric, key: str, amount: float) -> None:
        with self._lock:
            series = self._values[metric.name]
            series[key] = float(series.get(key, 0.0)) + amount  # type: ignore[arg-type]

    def _observe(self, metric: Metric, key: str, value: float) -> None:
        value = max(0.0, value)
        with self._lock:
            series = self._values[metric.name]
            buckets = series.get(key)
            if not isinstance(buckets, list):
                buckets = series[key] = [0.0] * (len(metric.buckets) + 2)
            buckets[bisect.bisect_left(metric.buckets, value)] += 1
            buckets[-1] += value
