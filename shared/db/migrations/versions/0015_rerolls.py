"""rerolls: images rendered again with the next seeds of their family, and which of each chain is kept

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "reroll_of",
                sa.BigInteger(),
                nullable=True,
                comment="a re-roll's first image: the one rendered with the job's own seed",
            )
        )
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "reroll_of",
                _ID,
                nullable=True,
                comment="a re-rolled image's first render (the job's own seed): the chain it belongs to",
            )
        )
        batch_op.add_column(
            sa.Column(
                "superseded_by",
                _ID,
                nullable=True,
                comment="the kept image of its re-roll chain, on each of the others (kept, not delivered)",
            )
        )
        batch_op.create_foreign_key("fk_artifacts_reroll_of", "artifacts", ["reroll_of"], ["id"], ondelete="CASCADE")
        batch_op.create_foreign_key(
            "fk_artifacts_superseded_by", "artifacts", ["superseded_by"], ["id"], ondelete="SET NULL"
        )
        batch_op.create_index("ix_artifacts_reroll_of", ["reroll_of"])


def downgrade() -> None:
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_index("ix_artifacts_reroll_of")
        batch_op.drop_constraint("fk_artifacts_superseded_by", type_="foreignkey")
        batch_op.drop_constraint("fk_artifacts_reroll_of", type_="foreignkey")
        batch_op.drop_column("superseded_by")
        batch_op.drop_column("reroll_of")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("reroll_of")
