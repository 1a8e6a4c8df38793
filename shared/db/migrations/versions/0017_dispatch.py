"""dispatch: queued tasks wait in the database until their turn, their messages sent a window at a time

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

HELD = sa.text("status = 'queued' AND dispatched_at IS NULL")
SENT = sa.text("status = 'queued' AND dispatched_at IS NOT NULL")


def upgrade() -> None:
    # A plain ADD COLUMN: SQLite keeps the table (and its count triggers) as it is.
    op.add_column(
        "tasks",
        sa.Column(
            "dispatched_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="when its message was sent (database clock); null while a queued task waits in the database "
            "for its turn (shared.dispatch)",
        ),
    )
    op.execute("UPDATE tasks SET dispatched_at = due_at WHERE status = 'queued'")  # sent at their submit
    op.create_index("ix_tasks_held", "tasks", ["job_id", "ordinal"], postgresql_where=HELD, sqlite_where=HELD)
    op.create_index("ix_tasks_sent", "tasks", ["due_at"], postgresql_where=SENT, sqlite_where=SENT)


def downgrade() -> None:
    op.drop_index("ix_tasks_sent", table_name="tasks")
    op.drop_index("ix_tasks_held", table_name="tasks")
    op.drop_column("tasks", "dispatched_at")
