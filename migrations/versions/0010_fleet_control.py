"""Fleet control across replicas: one control row, and a row per replica that acknowledges it.

Why: pause, resume and the policy versions were decided per host (the ``serve --workers`` supervisor).
Replicas on one database each had their own, so a pause through one replica let the others' calls go
on, and a version set through one was unknown to the others. ``fleet_control`` holds the fleet's
state (which request is the latest, whether it is paused and how, every upstream's version), and
each replica applies it and says so in its ``fleet_replicas`` row (``proxy/fleet/replicas.py``).

Revision ID: 0010_fleet_control
Revises: 0009_certificates
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_fleet_control"
down_revision = "0009_certificates"
branch_labels = None
depends_on = None


def upgrade() -> None:
    control = op.create_table(
        "fleet_control",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("generation", sa.BigInteger(), nullable=False),  # the latest pause or resume
        sa.Column("revision", sa.BigInteger(), nullable=False),  # the latest change of any kind
        sa.Column("paused", sa.String(length=16), nullable=True),  # the pause mode; null: running
        sa.Column("versions", sa.Text(), nullable=False),  # JSON: upstream URL -> version
    )
    op.bulk_insert(control, [{"id": 1, "generation": 0, "revision": 0, "paused": None, "versions": "{}"}])
    op.create_table(
        "fleet_replicas",
        sa.Column("replica", sa.String(length=64), primary_key=True),
        sa.Column("seen_revision", sa.BigInteger(), nullable=False),  # the control row it applied
        sa.Column("drained_generation", sa.BigInteger(), nullable=False),  # paused with no call running
        sa.Column("heartbeat_at", sa.Float(), nullable=False),  # the database's clock, epoch seconds
    )


def downgrade() -> None:
    op.drop_table("fleet_replicas")
    op.drop_table("fleet_control")
