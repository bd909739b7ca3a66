"""The RL loop: each call's policy version (and spans when it changed mid-call), the versions seen in
order, and trajectory groups (GRPO); the turns and trajectory_summary views show them.

Revision ID: 0005_rl_loop
Revises: 0004_drift
Create Date: 2026-12-03
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0005_rl_loop"
down_revision = "0004_drift"
branch_labels = None
depends_on = None

# 0004's views (a frozen migration) with this revision's columns added
_DRIFT = importlib.import_module("tokentrail.migrations.versions.0004_drift")
TURNS = _DRIFT.TURNS.replace(
    "    c.token_in_fallback AS token_in_fallback\n",
    "    c.token_in_fallback AS token_in_fallback,\n    c.weight_version AS weight_version\n",
)
TRAJECTORY_SUMMARY = _DRIFT.TRAJECTORY_SUMMARY.replace(
    "        THEN 1 ELSE 0 END AS one_sequence\n",
    "        THEN 1 ELSE 0 END AS one_sequence,\n"
    "    t.group_id AS group_id,\n"
    "    coalesce(c.weight_versions_seen, 0) AS weight_versions_seen,\n"
    "    coalesce(c.aborted_calls, 0) AS aborted_calls\n",
).replace(
    "            THEN 1 ELSE 0 END) AS sequence_breaks\n",
    "            THEN 1 ELSE 0 END) AS sequence_breaks,\n"
    "        count(DISTINCT weight_version) AS weight_versions_seen,\n"
    "        sum(CASE WHEN outcome = 'aborted' THEN 1 ELSE 0 END) AS aborted_calls\n",
)
assert "weight_version AS weight_version" in TURNS
assert "aborted_calls" in TRAJECTORY_SUMMARY


def upgrade() -> None:
    op.execute("DROP VIEW trajectory_summary")
    op.execute("DROP VIEW turns")
    with op.batch_alter_table("llm_calls") as batch:
        batch.add_column(sa.Column("weight_version", sa.String(), nullable=True))
        batch.add_column(sa.Column("weight_versions", sa.JSON(), nullable=True))
    with op.batch_alter_table("trajectories") as batch:
        batch.add_column(sa.Column("group_id", sa.String(length=256), nullable=True))
    op.create_index("ix_trajectories_group_id", "trajectories", ["group_id"])
    op.create_table(
        "weight_versions",
        sa.Column("version", sa.String(length=256), primary_key=True),
        sa.Column("first_seen_at", sa.DateTime(), nullable=False),
    )
    op.execute(TURNS)
    op.execute(TRAJECTORY_SUMMARY)


def downgrade() -> None:
    op.execute("DROP VIEW trajectory_summary")
    op.execute("DROP VIEW turns")
    op.drop_table("weight_versions")
    op.drop_index("ix_trajectories_group_id", table_name="trajectories")
    with op.batch_alter_table("trajectories") as batch:
        batch.drop_column("group_id")
    with op.batch_alter_table("llm_calls") as batch:
        batch.drop_column("weight_versions")
        batch.drop_column("weight_version")
    op.execute(_DRIFT.TURNS)
    op.execute(_DRIFT.TRAJECTORY_SUMMARY)
