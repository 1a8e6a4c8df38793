"""task lifecycle: due times, failure kinds, job queues, idle workers

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "queue",
                sa.String(length=255),
                server_default="archfarm",
                nullable=False,
                comment="the broker queue every message of this job goes to",
            )
        )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "due_at",
                sa.DateTime(timezone=True),
                server_default=sa.text("CURRENT_TIMESTAMP"),
                nullable=False,
                comment="when a queued task's latest message becomes deliverable (database clock); the sweeper "
                "re-sends tasks long past it",
            )
        )
        batch_op.create_index("ix_tasks_status_due", ["status", "due_at"], unique=False)
    with op.batch_alter_table("task_failures", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.String(length=16), server_default="error", nullable=False))
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "idle_since",
                sa.DateTime(timezone=True),
                nullable=True,
                comment="set while the worker holds no task (database clock): the sweeper's evidence",
            )
        )
        batch_op.add_column(sa.Column("queues", sa.JSON(), server_default="[]", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("queues")
        batch_op.drop_column("idle_since")
    with op.batch_alter_table("task_failures", schema=None) as batch_op:
        batch_op.drop_column("kind")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_status_due")
        batch_op.drop_column("due_at")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("queue")
