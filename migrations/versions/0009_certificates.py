"""Certificates: what produced each call's tokens, stored once per distinct value.

A certificate names the chat template (a hash of the upstream's default template as it renders a
fixed probe conversation, and of the request's ``chat_template``, ``chat_template_kwargs`` and
``tools``), the model and tokenizer as vLLM reports them (``/v1/models``; the tokenizer's IDs for a
fixed probe text), vLLM's version (``/version``), a digest of the sampling parameters and the weight
version. Each call refers to its certificate (``llm_calls.certificate_id``), so a trainer can keep
only the sequences made under one. The ``llm_calls`` and ``turns`` views show the reference.

Revision ID: 0009_certificates
Revises: 0008_metric_counts
Create Date: 2026-12-07
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0009_certificates"
down_revision = "0008_metric_counts"
branch_labels = None
depends_on = None

# 0006's views (a frozen migration) with this revision's column added
_STORED = importlib.import_module("tokentrail.migrations.versions.0006_stored_calls")
TURNS = _STORED.TURNS.replace(
    "    c.weight_version AS weight_version\n",
    "    c.weight_version AS weight_version,\n    c.certificate_id AS certificate_id\n",
)
_CALLS_END = "weight_versions FROM llm_calls_stored c"
assert "certificate_id AS certificate_id" in TURNS
assert _STORED.POSTGRES_VIEW.endswith(_CALLS_END)


def _calls_view(*, with_certificate: bool) -> str:
    postgres = op.get_bind().dialect.name == "postgresql"
    view: str = _STORED.POSTGRES_VIEW if postgres else _STORED.sqlite_view(_STORED.MESSAGE_BY_TYPE)
    assert view.endswith(_CALLS_END)
    if with_certificate:
        view = view.replace(_CALLS_END, "weight_versions, certificate_id FROM llm_calls_stored c")
    return view


def upgrade() -> None:
    op.create_table(
        "certificates",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column("template_hash", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(), nullable=True),
        sa.Column("model_root", sa.String(), nullable=True),
        sa.Column("tokenizer", sa.String(length=64), nullable=True),
        sa.Column("vllm_version", sa.String(), nullable=True),
        sa.Column("sampling_digest", sa.String(length=64), nullable=False),
        sa.Column("sampling", sa.JSON(), nullable=True),
        sa.Column("weight_version", sa.String(), nullable=True),
        sa.Column("first_seen_at", sa.DateTime(), nullable=False),
    )
    op.execute("DROP VIEW trajectory_summary")
    op.execute("DROP VIEW turns")
    op.execute("DROP VIEW llm_calls")
    op.add_column("llm_calls_stored", sa.Column("certificate_id", sa.String(length=32), nullable=True))
    op.create_index("ix_llm_calls_certificate_id", "llm_calls_stored", ["certificate_id"])
    op.execute(_calls_view(with_certificate=True))
    op.execute(TURNS)
    op.execute(_STORED.TRAJECTORY_SUMMARY)


def downgrade() -> None:
    op.execute("DROP VIEW trajectory_summary")
    op.execute("DROP VIEW turns")
    op.execute("DROP VIEW llm_calls")
    op.drop_index("ix_llm_calls_certificate_id", table_name="llm_calls_stored")
    op.execute("ALTER TABLE llm_calls_stored DROP COLUMN certificate_id")
    op.drop_table("certificates")
    op.execute(_calls_view(with_certificate=False))
    op.execute(_STORED.TURNS)
    op.execute(_STORED.TRAJECTORY_SUMMARY)
