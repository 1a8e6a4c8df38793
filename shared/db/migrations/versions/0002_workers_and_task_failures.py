"""workers and task failures

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=255), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("current_task", sa.String(length=36), nullable=True),
        sa.Column("models", sa.JSON(), nullable=False),
        sa.Column("images_done", sa.Integer(), nullable=False),
        sa.Column("model_loads", sa.Integer(), nullable=False),
        sa.Column("stack_swaps", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.create_index("ix_workers_heartbeat", ["stopped_at", "heartbeat_at"], unique=False)

    op.create_table(
        "task_failures",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(length=36), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("task_failures", schema=None) as batch_op:
        batch_op.create_index("ix_task_failures_job_node", ["job_id", "node"], unique=False)
        batch_op.create_index("ix_task_failures_task", ["task_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("task_failures", schema=None) as batch_op:
        batch_op.drop_index("ix_task_failures_task")
        batch_op.drop_index("ix_task_failures_job_node")

    op.drop_table("task_failures")
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_index("ix_workers_heartbeat")

    op.drop_table("workers")
