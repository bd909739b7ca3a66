"""SQLModel tables. SQL is a user interface: columns are named for the people who will type them.

Token arrays are JSON so that ``json_array_length`` and ``json_each`` work in SQLite and PostgreSQL.
Times are UTC ``datetime`` values; the raw monotonic-free epoch seconds are not stored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel


class Trajectory(SQLModel, table=True):
    """One agent run: the calls sent with the same ``X-Trajectory-Id``."""

    __tablename__ = "trajectories"
    __table_args__ = (Index("ix_trajectories_created_at", "created_at", "id"),)

    id: str = Field(primary_key=True, max_length=256)
    created_at: datetime
    updated_at: datetime
    reward: float | None = None
    metadata_: dict[str, Any] | None = Field(default=None, sa_column=Column("metadata", JSON, nullable=True))
    call_count: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    id_generated: bool = False
    tags: dict[str, str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    finished: bool = False
    finished_at: datetime | None = None
    rewarded_at: datetime | None = None
    group_id: str | None = Field(default=None, max_length=256, index=True)
    # When ``tokentrail export --mark-exported`` last wrote it, and how many calls it had then
    # (``db prune --exported`` takes it only while both still hold).
    exported_at: datetime | None = None
    exported_calls: int | None = None


class LlmCall(SQLModel, table=True):
    """One chat or text completion call, whatever its outcome, with its prompt and request stored
    against an earlier call of its trajectory (``storage/stored_calls.py``). SQL users read the
    ``llm_calls`` view, which has the full ``request`` and ``prompt_token_ids`` instead."""

    __tablename__ = "llm_calls_stored"
    __table_args__ = (
        UniqueConstraint("trajectory_id", "seq", name="uq_llm_calls_trajectory_seq"),
        Index("ix_llm_calls_received_at", "received_at"),
        Index("ix_llm_calls_outcome", "outcome"),
        Index("ix_llm_calls_base_call_id", "base_call_id"),
        Index("ix_llm_calls_certificate_id", "certificate_id"),
    )

    id: str = Field(primary_key=True, max_length=32)
    trajectory_id: str = Field(foreign_key="trajectories.id", max_length=256)
    seq: int
    route: str
    model: str | None = None
    upstream: str | None = None
    stream: bool = False
    received_at: datetime
    upstream_first_byte_at: datetime | None = None
    finished_at: datetime | None = None
    latency_ms: float | None = None
    status_code: int | None = None
    outcome: str
    integrity: str
    error: str | None = None
    response_id: str | None = None
    request_rest: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    prompt_rest_ids: list[int] | None = Field(default=None, sa_column=Column(JSON(none_as_null=True)))
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    weight_version: str | None = None
    weight_versions: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON, nullable=True))

    # How the prompt relates to the trajectory's previous call (proxy/trajectory/drift.py).
    drift: str | None = None
    drift_position: int | None = None
    token_in_fallback: str | None = None  # why token-in did not build this prompt (NULL: built, or off)

    # The stored form (storage/stored_calls.py): what is shared with the base call, then the rest.
    # A foreign key (migration 0007): a call's base cannot be deleted while the call remains.
    base_call_id: str | None = Field(default=None, max_length=32, foreign_key="llm_calls_stored.id")
    base_choice_index: int | None = None
    prompt_shared_tokens: int = 0
    request_shared_messages: int = 0

    # What produced the call's tokens (``certificates``, migration 0009; no foreign key: a
    # certificate is kept when its calls are pruned).
    certificate_id: str | None = Field(default=None, max_length=32)

    # Whether seq waited for the record of an earlier turn another writer had (recording/order.py,
    # migration 0011): waited, unproven, or NULL.
    order_wait: str | None = Field(default=None, max_length=16)


class Certificate(SQLModel, table=True):
    """What produced a call's tokens, once per distinct value (``proxy/recording/certificate.py``):
    the template (with tools and arguments), model, tokenizer, vLLM version, sampling, weights."""

    __tablename__ = "certificates"

    id: str = Field(primary_key=True, max_length=32)
    template_hash: str = Field(max_length=64)
    model: str | None = None
    model_root: str | None = None
    tokenizer: str | None = Field(default=None, max_length=64)
    vllm_version: str | None = None
    sampling_digest: str = Field(max_length=64)
    sampling: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    weight_version: str | None = None
    first_seen_at: datetime


class WeightVersionSeen(SQLModel, table=True):
    """Each policy version the proxy has seen, with when it first saw it: the order of versions,
    which staleness ("versions behind the newest") is counted in, whatever the versions are called."""

    __tablename__ = "weight_versions"

    version: str = Field(primary_key=True, max_length=256)
    first_seen_at: datetime


class MetricCount(SQLModel, table=True):
    """A counter (or a histogram bucket) of one TokenTrail instance, added to in the transaction that
    writes the records it counts (``proxy/metrics/persisted.py``)."""

    __tablename__ = "metric_counts"

    instance: str = Field(primary_key=True, max_length=256)
    metric: str = Field(primary_key=True, max_length=128)
    labels: str = Field(primary_key=True, max_length=1024)
    value: float


class Completion(SQLModel, table=True):
    """One generated choice of a call (``n`` > 1 gives several rows)."""

    __tablename__ = "completions"

    call_id: str = Field(foreign_key="llm_calls_stored.id", primary_key=True, max_length=32)
    choice_index: int = Field(primary_key=True)
    token_ids: list[int] = Field(sa_column=Column(JSON, nullable=False))
    logprobs: list[Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    finish_reason: str | None = None
    stop_reason: str | None = None
    message: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
