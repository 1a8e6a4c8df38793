"""job kinds: jobs.kind, jobs.digest for any kind, and task columns that only render tasks fill

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

RENDER_COLUMNS = (
    ("plan_url", sa.String(length=2048)),
    ("plan_name", sa.String(length=64)),
    ("plan_digest", sa.String(length=64)),
    ("style", sa.String(length=64)),
    ("seeds", sa.JSON()),
    ("outputs", sa.JSON()),
)


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "kind",
                sa.Enum("render", "train", name="job_kind", native_enum=False, length=16, create_constraint=True),
                server_default="render",
                nullable=False,
                comment="what the job does",
            )
        )
        batch_op.alter_column(
            "profile_digest",
            new_column_name="digest",
            existing_type=sa.String(length=64),
            comment="content hash of what decides the job's outputs: a render's profile, a training run's data, model "
            "and optimiser settings",
        )
    jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("spec", sa.JSON), sa.column("kind", sa.String))
    connection = op.get_bind()
    # Until now a training job was told from a render job by its spec's `train` mapping: said once, here.
    training = [job_id for job_id, spec in connection.execute(sa.select(jobs.c.id, jobs.c.spec)) if "train" in spec]
    if training:
        connection.execute(sa.update(jobs).where(jobs.c.id.in_(training)).values(kind="train"))
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        for name, kind in RENDER_COLUMNS:
            batch_op.alter_column(name, existing_type=kind, nullable=True)
    tasks = sa.table("tasks", sa.column("job_id", sa.String), *(sa.column(name, kind) for name, kind in RENDER_COLUMNS))
    if training:  # their placeholders ("dataset", "train", the seed) go: a training task has no plan or style
        connection.execute(
            sa.update(tasks).where(tasks.c.job_id.in_(training)).values({name: None for name, _ in RENDER_COLUMNS})
        )


def downgrade() -> None:
    tasks = sa.table("tasks", *(sa.column(name, kind) for name, kind in RENDER_COLUMNS))
    placeholders = {
        "plan_url": "",
        "plan_name": "dataset",
        "plan_digest": "",
        "style": "train",
        "seeds": [],
        "outputs": [],
    }
    op.get_bind().execute(sa.update(tasks).where(tasks.c.plan_url.is_(None)).values(placeholders))
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        for name, kind in RENDER_COLUMNS:
            batch_op.alter_column(name, existing_type=kind, nullable=False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column(
            "digest", new_column_name="profile_digest", existing_type=sa.String(length=64), comment=None
        )
        batch_op.drop_column("kind")
