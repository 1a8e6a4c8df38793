"""costs: measured GPU-seconds per image per profile and device model

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "costs",
        sa.Column("profile_digest", sa.String(length=64), nullable=False),
        sa.Column("device", sa.String(length=128), nullable=False, comment="the device model: NVIDIA H100, cpu"),
        sa.Column("seconds_per_image", sa.Float(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.PrimaryKeyConstraint("profile_digest", "device"),
    )


def downgrade() -> None:
    op.drop_table("costs")
