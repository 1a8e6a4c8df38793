"""stages: a job's pick gate, a task's pass and source, an artifact's pass, parent, adherence and pick

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "gate",
                sa.Enum(
                    "open", "rule", "closed", name="pick_gate", native_enum=False, length=16, create_constraint=False
                ),
                nullable=True,
                comment="a staged job's pick gate: open, rule, closed",
            )
        )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("stage", sa.String(length=16), nullable=True, comment="a staged job's pass: draft, final")
        )
        batch_op.add_column(
            sa.Column(
                "source_id",
                sa.BigInteger(),
                nullable=True,
                comment="the artifact a final starts from (its picked draft, of the same job)",
            )
        )
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "stage",
                sa.String(length=16),
                server_default="render",
                nullable=False,
                comment="render (a single-pass job), draft or final",
            )
        )
        batch_op.add_column(
            sa.Column(
                "parent_id",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                nullable=True,
                comment="the image this one was made from",
            )
        )
        batch_op.add_column(
            sa.Column(
                "adherence",
                sa.Float(),
                nullable=True,
                comment="how well the image's edges follow its plan's (F-score, 0-1)",
            )
        )
        batch_op.add_column(
            sa.Column(
                "picked_at", sa.DateTime(timezone=True), nullable=True, comment="when a draft was picked for a final"
            )
        )
        batch_op.create_foreign_key("fk_artifacts_parent", "artifacts", ["parent_id"], ["id"], ondelete="SET NULL")
        batch_op.drop_constraint("uq_artifacts_image", type_="unique")
        batch_op.create_unique_constraint("uq_artifacts_image", ["job_id", "stage", "plan_digest", "style", "seed"])


def downgrade() -> None:
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_constraint("uq_artifacts_image", type_="unique")
        batch_op.create_unique_constraint("uq_artifacts_image", ["job_id", "plan_digest", "style", "seed"])
        batch_op.drop_constraint("fk_artifacts_parent", type_="foreignkey")
        for name in ("picked_at", "adherence", "parent_id", "stage"):
            batch_op.drop_column(name)
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("source_id")
        batch_op.drop_column("stage")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("gate")
