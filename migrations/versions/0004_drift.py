"""Drift diagnosis and token-in per call; the views show them.

``llm_calls.drift`` (first, extends, token_in, retokenized, template, edited), ``drift_position``
(the first prompt token that differs from the previous call's prompt + generated IDs) and
``token_in_fallback`` (why token-in did not build the prompt). ``turns`` gains the three;
``trajectory_summary`` gains the counts of token-in calls and of breaks by cause, and
``one_sequence``: the trajectory's finished calls form one exact training sequence.

Revision ID: 0004_drift
Revises: 0003_upstream
Create Date: 2026-12-03
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0004_drift"
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
    c.drift AS drift,
    c.drift_position AS drift_position,
    c.token_in_fallback AS token_in_fallback
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
    coalesce(c.token_in_calls, 0) AS token_in_calls,
    coalesce(c.retokenized_breaks, 0) AS retokenized_breaks,
    coalesce(c.template_breaks, 0) AS template_breaks,
    coalesce(c.edited_breaks, 0) AS edited_breaks,
    CASE WHEN coalesce(c.ok_calls, 0) > 0 AND coalesce(c.sequence_breaks, 0) = 0
        THEN 1 ELSE 0 END AS one_sequence
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
        sum(CASE WHEN drift = 'token_in' THEN 1 ELSE 0 END) AS token_in_calls,
        sum(CASE WHEN outcome = 'ok' AND drift = 'retokenized' THEN 1 ELSE 0 END) AS retokenized_breaks,
        sum(CASE WHEN outcome = 'ok' AND drift = 'template' THEN 1 ELSE 0 END) AS template_breaks,
        sum(CASE WHEN outcome = 'ok' AND drift = 'edited' THEN 1 ELSE 0 END) AS edited_breaks,
        sum(CASE WHEN outcome = 'ok' AND drift IN ('retokenized', 'template', 'edited')
            THEN 1 ELSE 0 END) AS sequence_breaks
    FROM llm_calls
    GROUP BY trajectory_id
) c ON c.trajectory_id = t.id
"""


def upgrade() -> None:
    with op.batch_alter_table("llm_calls") as batch:
        batch.add_column(sa.Column("drift", sa.String(), nullable=True))
        batch.add_column(sa.Column("drift_position", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("token_in_fallback", sa.String(), nullable=True))
    op.execute("DROP VIEW trajectory_summary")
    op.execute("DROP VIEW turns")
    op.execute(TURNS)
    op.execute(TRAJECTORY_SUMMARY)


def downgrade() -> None:
    views = importlib.import_module("tokentrail.migrations.versions.0002_trainers")
    op.execute("DROP VIEW trajectory_summary")
    op.execute("DROP VIEW turns")
    with op.batch_alter_table("llm_calls") as batch:
        batch.drop_column("token_in_fallback")
        batch.drop_column("drift_position")
        batch.drop_column("drift")
    op.execute(views.TURNS)
    op.execute(views.TRAJECTORY_SUMMARY)
