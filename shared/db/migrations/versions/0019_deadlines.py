"""jobs.deadline_at and jobs.expected_at: deadlines, served earliest first, and the forecast that missed one

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "jobs",
        sa.Column(
            "deadline_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="when the job should be done (`deadline:`): earliest first within a priority",
        ),
    )
    op.add_column(
        "jobs",
        sa.Column(
            "expected_at",
            sa.DateTime(timezone=True),
            nullable=True,
            comment="the finish the farm forecast when it first expected the job to miss its deadline (notified)",
        ),
    )


def downgrade() -> None:
    op.drop_column("jobs", "expected_at")
    op.drop_column("jobs", "deadline_at")
