"""Initial schema: trajectories, llm_calls, completions.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trajectories",
        sa.Column("id", sa.String(256), primary_key=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("reward", sa.Float(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=True),
        sa.Column("call_count", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("completion_tokens", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("id_generated", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.create_table(
        "llm_calls",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("trajectory_id", sa.String(256), sa.ForeignKey("trajectories.id"), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("route", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=True),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("upstream_first_byte_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(), nullable=False),
        sa.Column("integrity", sa.String(), nullable=False),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("response_id", sa.String(), nullable=True),
        sa.Column("request", sa.JSON(), nullable=True),
        sa.Column("prompt_token_ids", sa.JSON(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("total_tokens", sa.Integer(), nullable=True),
        sa.UniqueConstraint("trajectory_id", "seq", name="uq_llm_calls_trajectory_seq"),
    )
    op.create_index("ix_llm_calls_received_at", "llm_calls", ["received_at"])
    op.create_index("ix_llm_calls_outcome", "llm_calls", ["outcome"])
    op.create_table(
        "completions",
        sa.Column("call_id", sa.String(32), sa.ForeignKey("llm_calls.id"), primary_key=True),
        sa.Column("choice_index", sa.Integer(), primary_key=True),
        sa.Column("token_ids", sa.JSON(), nullable=False),
        sa.Column("logprobs", sa.JSON(), nullable=True),
        sa.Column("finish_reason", sa.String(), nullable=True),
        sa.Column("stop_reason", sa.String(), nullable=True),
        sa.Column("message", sa.JSON(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("completions")
    op.drop_index("ix_llm_calls_outcome", table_name="llm_calls")
    op.drop_index("ix_llm_calls_received_at", table_name="llm_calls")
    op.drop_table("llm_calls")
    op.drop_table("trajectories")
