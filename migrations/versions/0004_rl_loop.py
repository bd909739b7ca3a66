"""The RL loop: each call's policy version (and spans when it changed mid-call), the versions seen in
order, and trajectory groups (GRPO); the turns and trajectory_summary views show them.

Revision ID: 0004_rl_loop
Revises: 0003_upstream
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_rl_loop"
down_revision = "0003_upstream"
branch_labels = None
depends_on = None

TURNS = """
CREATE VIEW turns AS
SELECT
    c.trajectory_id AS trajectory_id,
    c.seq AS seq,
    c.id AS call_id,
    d.choice_index AS choice_index,
    c.route AS route,
    c.model AS model,
    c.outcome AS outcome,
    c.integrity AS integrity,
    json_array_length(c.prompt_token_ids) AS prompt_len,
    json_array_length(d.token_ids) AS response_len,
    d.finish_reason AS finish_reason,
    c.latency_ms AS latency_ms,
    c.received_at AS received_at,
    c.weight_version AS weight_version
FROM llm_calls c
LEFT JOIN completions d ON d.call_id = c.id
"""

TRAJECTORY_SUMMARY = """
CREATE VIEW trajectory_summary AS
SELECT
    t.id AS trajectory_id,
    t.reward AS reward,
    t.finished AS finished,
    t.tags AS tags,
    coalesce(c.calls, 0) AS calls,
    coalesce(c.prompt_tokens, 0) AS prompt_tokens,
    coalesce(c.completion_tokens, 0) AS completion_tokens,
    c.first_call_at AS first_call_at,
    c.last_call_at AS last_call_at,
    coalesce(c.ok_calls, 0) AS ok_calls,
    coalesce(c.upstream_error_calls, 0) AS upstream_error_calls,
    coalesce(c.upstream_failed_calls, 0) AS upstream_failed_calls,
    coalesce(c.disconnected_calls, 0) AS disconnected_calls,
    coalesce(c.integrity_problems, 0) AS integrity_problems,
    t.group_id AS group_id,
    coalesce(c.weight_versions_seen, 0) AS weight_versions_seen,
    coalesce(c.aborted_calls, 0) AS aborted_calls
FROM trajectories t
LEFT JOIN (
    SELECT
        trajectory_id,
        count(*) AS calls,
        sum(prompt_tokens) AS prompt_tokens,
        sum(completion_tokens) AS completion_tokens,
        min(received_at) AS first_call_at,
        max(finished_at) AS last_call_at,
        sum(CASE WHEN outcome = 'ok' THEN 1 ELSE 0 END) AS ok_calls,
        sum(CASE WHEN outcome = 'upstream_error' THEN 1 ELSE 0 END) AS upstream_error_calls,
        sum(CASE WHEN outcome IN ('upstream_unreachable', 'upstream_timeout', 'upstream_died')
            THEN 1 ELSE 0 END) AS upstream_failed_calls,
        sum(CASE WHEN outcome = 'client_disconnected' THEN 1 ELSE 0 END) AS disconnected_calls,
        sum(CASE WHEN integrity NOT IN ('ok', 'not_checked', 'no_usage', 'no_token_ids')
            THEN 1 ELSE 0 END) AS integrity_problems,
        count(DISTINCT weight_version) AS weight_versions_seen,
        sum(CASE WHEN outcome = 'aborted' THEN 1 ELSE 0 END) AS aborted_calls
    FROM llm_calls
    GROUP BY trajectory_id
) c ON c.trajectory_id = t.id
"""


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
    from importlib import import_module

    previous = import_module("tokentrail.migrations.versions.0002_trainers")
    op.execute("DROP VIEW trajectory_summary")
    op.execute("DROP VIEW turns")
    op.drop_table("weight_versions")
    op.drop_index("ix_trajectories_group_id", table_name="trajectories")
    with op.batch_alter_table("trajectories") as batch:
        batch.drop_column("group_id")
    with op.batch_alter_table("llm_calls") as batch:
        batch.drop_column("weight_versions")
        batch.drop_column("weight_version")
    op.execute(previous.TURNS)
    op.execute(previous.TRAJECTORY_SUMMARY)
