"""Every metric TokenTrail exports: its name, kind, help text and labels, in one place.

The README's metric table, the Grafana dashboard and the tests read these names. Labels are bounded
sets (routes, outcomes, integrity values, configured upstream URLs, fallback reasons): never prompt
or response text, never a trajectory id.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


class Combine(enum.StrEnum):
    """How the figures of several workers make one."""

    SUM = "sum"
    MIN = "min"  # upstream_up: down if any worker sees it down


@dataclass(frozen=True)
class Metric:
    name: str  # without ``_total`` for counters (prometheus_client adds it)
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # upper bounds of a histogram, +Inf implied
    combine: Combine = Combine.SUM


# Latency bounds in seconds. The proxy's own time is sub-millisecond to milliseconds; vLLM's first token
# is tens of milliseconds to seconds (prefill of a long prompt, a queue).
ADDED_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

CALLS = Metric(
    "tokentrail_calls",
    Kind.COUNTER,
    "Recorded calls by route, outcome and integrity.",
    ("route", "outcome", "integrity"),
)
PROMPT_TOKENS = Metric(
    "tokentrail_prompt_tokens", Kind.COUNTER, "Prompt tokens of recorded calls.", ("route",)
)
GENERATED_TOKENS = Metric(
    "tokentrail_generated_tokens", Kind.COUNTER, "Generated tokens of recorded calls.", ("route",)
)
TOKEN_IN_FALLBACKS = Metric(
    "tokentrail_token_in_fallbacks",
    Kind.COUNTER,
    "Calls that fell back from token-in to text, by reason.",
    ("reason",),
)
TOKEN_IN_RENDERS = Metric(
    "tokentrail_token_in_renders",
    Kind.COUNTER,
    "Token-in calls by how their new tokens were found: stand_in, full, checked, differs, untrusted.",
    ("how",),
)
RECORD_ORDER_WAITS = Metric(
    "tokentrail_record_order_waits",
    Kind.COUNTER,
    "Records that waited for the record of a reply their history holds (another worker's or replica's "
    "writer was behind): waited (seq follows it) or unproven (it never came in time; seq may precede it).",
    ("how",),
)
ADDED_LATENCY = Metric(
    "tokentrail_added_latency_seconds",
    Kind.HISTOGRAM,
    "The proxy's own time per call: total minus the upstream's time (calls where both are known).",
    ("route",),
    ADDED_LATENCY_BUCKETS,
)
FIRST_TOKEN = Metric(
    "tokentrail_upstream_first_token_seconds",
    Kind.HISTOGRAM,
    "From receiving a call to the upstream's first response byte.",
    ("route",),
    FIRST_TOKEN_BUCKETS,
)
DURATION = Metric(
    "tokentrail_call_duration_seconds",
    Kind.HISTOGRAM,
    "From receiving a call to its end, as the proxy saw it.",
    ("route",),
    DURATION_BUCKETS,
)
RECORDS_WRITTEN = Metric("tokentrail_records_written", Kind.COUNTER, "Records committed to the database.")
RECORDS_SPOOLED = Metric(
    "tokentrail_records_spooled", Kind.COUNTER, "Records the database did not take at first (to the spool)."
)
RECORDS_REPLAYED = Metric(
    "tokentrail_records_replayed", Kind.COUNTER, "Spooled records written to the database later."
)
RECORDS_LOST = Metric("tokentrail_records_lost", Kind.COUNTER, "Records the full spool could not take.")
RECORDS_REFUSED = Metric(
    "tokentrail_records_refused", Kind.COUNTER, "Records the database refused on their own (set aside)."
)
QUEUE_DEPTH = Metric("tokentrail_writer_queue_depth", Kind.GAUGE, "Records waiting for the writer thread.")
QUEUE_CAPACITY = Metric(
    "tokentrail_writer_queue_capacity", Kind.GAUGE, "Records the queue holds before spilling to the spool."
)
RECORDS_HELD = Metric(
    "tokentrail_records_held",
    Kind.GAUGE,
    "Records this process's writer holds until the record of a reply their history holds is written "
    "(with TOKENTRAIL_RECORDER=process the recorder holds them: not reported).",
)
SPOOL_BYTES = Metric("tokentrail_spool_bytes", Kind.GAUGE, "Bytes of records waiting in the spool.")
IN_FLIGHT = Metric("tokentrail_in_flight_calls", Kind.GAUGE, "Calls being relayed now.")
COUNTS_STALE = Metric(
    "tokentrail_metric_counts_stale",
    Kind.GAUGE,
    "1 while the database cannot be read: the counts of recorded calls are the last ones read.",
    combine=Combine.MIN,
)
UPSTREAM_UP = Metric(
    "tokentrail_upstream_up",
    Kind.GAUGE,
    "1 while the upstream is considered healthy (by every worker), else 0.",
    ("upstream",),
    combine=Combine.MIN,
)
UPSTREAM_IN_FLIGHT = Metric(
    "tokentrail_upstream_in_flight", Kind.GAUGE, "Calls open to the upstream now.", ("upstream",)
)
WORKERS_REPORTING = Metric(
    "tokentrail_workers_reporting",
    Kind.GAUGE,
    "Workers whose figures are in this answer (fresh within 5 s); 1 without --workers.",
)
RETENTION_TRAJECTORIES = Metric(
    "tokentrail_retention_pruned_trajectories",
    Kind.COUNTER,
    "Trajectories the retention job (TOKENTRAIL_RETENTION_DAYS) deleted.",
)
RETENTION_CALLS = Metric(
    "tokentrail_retention_pruned_calls",
    Kind.COUNTER,
    "Calls the retention job deleted.",
)
RETENTION_RUNS = Metric("tokentrail_retention_runs", Kind.COUNTER, "Retention runs that ended.")
RETENTION_FAILURES = Metric(
    "tokentrail_retention_failures",
    Kind.COUNTER,
    "Retention runs a database error ended.",
)
RETENTION_LAST_RUN = Metric(
    "tokentrail_retention_last_run_timestamp_seconds",
    Kind.GAUGE,
    "When the last retention run ended (Unix time; 0: none yet or retention off).",
)

ALL: tuple[Metric, ...] = (
    CALLS,
    PROMPT_TOKENS,
    GENERATED_TOKENS,
    TOKEN_IN_FALLBACKS,
    TOKEN_IN_RENDERS,
    RECORD_ORDER_WAITS,
    ADDED_LATENCY,
    FIRST_TOKEN,
    DURATION,
    RECORDS_WRITTEN,
    RECORDS_SPOOLED,
    RECORDS_REPLAYED,
    RECORDS_LOST,
    RECORDS_REFUSED,
    QUEUE_DEPTH,
    QUEUE_CAPACITY,
    RECORDS_HELD,
    SPOOL_BYTES,
    IN_FLIGHT,
    COUNTS_STALE,
    UPSTREAM_UP,
    UPSTREAM_IN_FLIGHT,
    WORKERS_REPORTING,
    RETENTION_TRAJECTORIES,
    RETENTION_CALLS,
    RETENTION_RUNS,
    RETENTION_FAILURES,
    RETENTION_LAST_RUN,
)
BY_NAME = {metric.name: metric for metric in ALL}
