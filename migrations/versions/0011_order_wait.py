"""Whether a call's ``seq`` waited for the record of an earlier turn: ``llm_calls.order_wait``.

Where other writers share the database (``serve --workers`` with the writer thread, replicas without
sticky routing), a record whose history holds a model reply that no recorded call gave waits for that
call's record (``proxy/recording/order.py``): ``waited`` when it came (``seq`` follows it),
``unproven`` when it did not within ``TOKENTRAIL_ORDER_WAIT_S`` (``seq`` may precede it), NULL when
nothing was waited for. The ``llm_calls`` view shows it.

Revision ID: 0011_order_wait
Revises: 0010_fleet_control
Create Date: 2026-12-08
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0011_order_wait"
down_revision = "0010_fleet_control"
branch_labels = None
depends_on = None

# 0009's views (a frozen migration) with this revision's column added to llm_calls
_STORED = importlib.import_module("tokentrail.migrations.versions.0006_stored_calls")
_CERTIFICATES = importlib.import_module("tokentrail.migrations.versions.0009_certificates")
_CALLS_END = "certificate_id FROM llm_calls_stored c"


def _calls_view(*, with_order_wait: bool) -> str:
    view: str = _CERTIFICATES._calls_view(with_certificate=True)
    assert view.endswith(_CALLS_END)
    if with_order_wait:
        view = view.replace(_CALLS_END, "certificate_id, order_wait FROM llm_calls_stored c")
    return view


def _recreate_views(*, with_order_wait: bool) -> None:
    op.execute(_calls_view(with_order_wait=with_order_wait))
    op.execute(_CERTIFICATES.TURNS)
    op.execute(_STORED.TRAJECTORY_SUMMARY)


def _drop_views() -> None:
    op.execute("DROP VIEW trajectory_summary")
    op.execute("DROP VIEW turns")
    op.execute("DROP VIEW llm_calls")


def upgrade() -> None:
    _drop_views()
    op.add_column("llm_calls_stored", sa.Column("order_wait", sa.String(length=16), nullable=True))
    _recreate_views(with_order_wait=True)


def downgrade() -> None:
    _drop_views()
    op.execute("ALTER TABLE llm_calls_stored DROP COLUMN order_wait")
    _recreate_views(with_order_wait=False)
