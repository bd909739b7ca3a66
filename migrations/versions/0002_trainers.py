"""Trajectories for trainers: tags, finished, reward time; the turns and trajectory_summary views.

Revision ID: 0002_trainers
Revises: 0001_initial
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_trainers"
down_revision = "0001_initial"
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
    c.received_at AS received_at
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
    coalesce(c.integrity_problems, 0) AS integrity_problems
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
            THEN 1 ELSE 0 END) AS integrity_problems
    FROM llm_calls
    GROUP BY trajectory_id
) c ON c.trajectory_id = t.id
"""


def upgrade() -> None:
    with op.batch_alter_table("trajectories") as batch:
        batch.add_column(sa.Column("tags", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("finished", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("finished_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("rewarded_at", sa.DateTime(), nullable=True))
    op.create_index("ix_trajectories_created_at", "trajectories", ["created_at", "id"])
    op.execute(TURNS)
    op.execute(TRAJECTORY_SUMMARY)


def downgrade() -> None:
    op.execute("DROP VIEW trajectory_summary")
    op.execute("DROP VIEW turns")
    op.drop_index("ix_trajectories_created_at", table_name="trajectories")
    with op.batch_alter_table("trajectories") as batch:
        batch.drop_column("rewarded_at")
        batch.drop_column("finished_at")
        batch.drop_column("finished")
        batch.drop_column("tags")
