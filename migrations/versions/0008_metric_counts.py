"""Metric counts committed with the records they count: ``metric_counts``.

Why: each process counted its calls in memory, so under ``serve --workers`` a worker that died took
its counts with it and the total went down. The writer now adds each batch's counts (calls by route,
outcome and integrity, tokens, token-in fallbacks, latency histogram buckets) in the transaction that
writes the batch, per TokenTrail instance (one ``serve``: all its workers). A scrape reads them back,
so they never go down and always equal the records that instance committed.

Revision ID: 0008_metric_counts
Revises: 0007_lifecycle
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_metric_counts"
down_revision = "0007_lifecycle"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "metric_counts",
        sa.Column("instance", sa.String(length=256), primary_key=True),
        sa.Column("metric", sa.String(length=128), primary_key=True),
        sa.Column("labels", sa.String(length=1024), primary_key=True),
        sa.Column("value", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("metric_counts")
