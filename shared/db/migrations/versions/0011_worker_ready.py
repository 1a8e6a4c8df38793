"""worker readiness (when a worker's pool process began taking tasks, and what it warmed first); picks' timeout

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "picks_close_at",
                sa.DateTime(timezone=True),
                nullable=True,
                comment="when an open pick gate closes by itself (`pick.timeout`; database clock)",
            )
        )
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "ready_at",
                sa.DateTime(timezone=True),
                nullable=True,
                comment="when its pool process began taking tasks, its profiles warmed (database clock)",
            )
        )
        batch_op.add_column(
            sa.Column(
                "warmed",
                sa.JSON(),
                server_default="[]",
                nullable=False,
                comment="what its pool process compiled before taking tasks: per profile, buckets and seconds",
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("warmed")
        batch_op.drop_column("ready_at")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("picks_close_at")
