"""Data lifecycle: a call's base is a foreign key, and trajectories remember when they were exported.

Why: since 0006 each call is stored against an earlier call of its trajectory (``base_call_id``).
Without a foreign key, a base deleted by hand made the ``llm_calls`` view return NULL silently (and
the API raise). Now the database itself refuses to delete a call that another call is stored
against, whoever deletes it; ``tokentrail db prune`` deletes whole trajectories, so it never does.
The index on ``base_call_id`` lets each deleted call's check find its dependants without a scan.

``trajectories.exported_at`` and ``exported_calls`` are set by ``tokentrail export
--mark-exported``: ``prune --exported`` deletes only a trajectory whose calls were all archived and
that has not changed since (same call count, not updated after).

SQLite cannot add a foreign key to a table: the table is rebuilt (alembic's batch mode), with the
three views that read it dropped before and created again, from their own stored text, after. A
database holding calls whose base is already gone (deleted by hand) is refused with the query that
lists them: the migration never deletes data itself.

Revision ID: 0007_lifecycle
Revises: 0006_stored_calls
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_lifecycle"
down_revision = "0006_stored_calls"
branch_labels = None
depends_on = None

FOREIGN_KEY = "fk_llm_calls_base_call"
BASE_INDEX = "ix_llm_calls_base_call_id"
# The views that read llm_calls_stored, in the order they are created (turns and
# trajectory_summary read the table; llm_calls is the table made whole).
_VIEWS = ("llm_calls", "turns", "trajectory_summary")
DANGLING = (
    "SELECT c.id, c.trajectory_id, c.base_call_id FROM llm_calls_stored c "
    "WHERE c.base_call_id IS NOT NULL "
    "AND NOT EXISTS (SELECT 1 FROM llm_calls_stored b WHERE b.id = c.base_call_id)"
)


class DanglingBaseError(RuntimeError):
    """Calls refer to a base the database no longer holds: the foreign key cannot be added."""


def _refuse_dangling_bases(connection: sa.Connection) -> None:
    rows = connection.execute(sa.text(f"{DANGLING} LIMIT 5")).all()
    if rows:
        count = connection.execute(sa.text(f"SELECT count(*) FROM ({DANGLING}) d")).scalar_one()
        examples = ", ".join(f"{call_id} (trajectory {trajectory})" for call_id, trajectory, _ in rows)
        raise DanglingBaseError(
            f"{count} call(s) are stored against a call that was deleted (e.g. {examples}); their "
            'prompts cannot be read back. List them with: tokentrail sql "' + DANGLING + '" and delete '
            'their trajectories (tokentrail sql "DELETE FROM completions ..."), then upgrade again.'
        )


def _sqlite_views(connection: sa.Connection) -> list[str]:
    """The stored CREATE VIEW text of the views that read the table, in creation order."""
    found: dict[str, str] = dict(
        connection.execute(
            sa.text("SELECT name, sql FROM sqlite_master WHERE type = 'view' AND name IN (:a, :b, :c)"),
            dict(zip("abc", _VIEWS, strict=True)),
        ).all()
    )
    return [found[name] for name in _VIEWS if name in found]


def upgrade() -> None:
    connection = op.get_bind()
    _refuse_dangling_bases(connection)
    op.add_column("trajectories", sa.Column("exported_at", sa.DateTime(), nullable=True))
    op.add_column("trajectories", sa.Column("exported_calls", sa.Integer(), nullable=True))
    op.create_index(BASE_INDEX, "llm_calls_stored", ["base_call_id"])
    if connection.dialect.name != "sqlite":
        # (in the one transaction of the upgrade: writes wait while the index is built and the key
        # checked, longer the more calls; upgrade at a quiet time, as the README says)
        op.create_foreign_key(FOREIGN_KEY, "llm_calls_stored", "llm_calls_stored", ["base_call_id"], ["id"])
        return
    views = _sqlite_views(connection)
    for name in reversed(_VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    # Foreign keys are off while the table is rebuilt (migrations/env.py); every reference is checked
    # with PRAGMA foreign_key_check before the commit, and dangling bases were refused above.
    with op.batch_alter_table("llm_calls_stored", recreate="always") as batch:
        batch.create_foreign_key(FOREIGN_KEY, "llm_calls_stored", ["base_call_id"], ["id"])
    for view in views:
        op.execute(view)


def downgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name == "sqlite":
        views = _sqlite_views(connection)
        for name in reversed(_VIEWS):
            op.execute(f"DROP VIEW IF EXISTS {name}")
        with op.batch_alter_table("llm_calls_stored", recreate="always") as batch:
            batch.drop_constraint(FOREIGN_KEY, type_="foreignkey")
        for view in views:
            op.execute(view)
    else:
        op.drop_constraint(FOREIGN_KEY, "llm_calls_stored", type_="foreignkey")
    op.drop_index(BASE_INDEX, table_name="llm_calls_stored")
    for column in ("exported_calls", "exported_at"):  # not a rebuild: other tables refer to it
        op.execute(f"ALTER TABLE trajectories DROP COLUMN {column}")
