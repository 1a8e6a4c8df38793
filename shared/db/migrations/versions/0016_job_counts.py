"""job counts: each job's tasks by status, finals, images and first start, kept by triggers

A million-task job's status, its API answer, `/metrics` and its dashboard page each read one row instead of
grouping its task rows. PostgreSQL's triggers run once per statement over its transition tables (a COPY of a
million tasks, or a cancel of all of them, adds one aggregate); SQLite's run per row (embedded jobs are small).
A later migration that rebuilds `tasks` or `artifacts` on SQLite (a batch "move and copy") drops their
triggers with the old table and must create them again.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def _postgresql() -> list[str]:
    def signed(rows: str, sign: str) -> str:
        """Each row's statuses as 0/1 columns, `sign`ed: the new rows add, the old rows take away."""
        return ", ".join(f"{sign}({rows}.status = '{s}')::int" for s in STATUSES)

    counted = ", ".join(STATUSES)
    names = f"job_id, {counted}, finals, started_at"

    def upsert(having: str = "") -> str:
        return f"""
            INSERT INTO job_counts AS c (job_id, {counted}, finals, started_at)
            SELECT job_id, {", ".join(f"sum({s})" for s in STATUSES)}, sum(finals), min(started_at)
            FROM changed GROUP BY job_id {having} ORDER BY job_id
            ON CONFLICT (job_id) DO UPDATE SET
                {", ".join(f"{s} = c.{s} + excluded.{s}" for s in STATUSES)}, finals = c.finals + excluded.finals,
                started_at = LEAST(c.started_at, excluded.started_at);
        """

    # An update's change is its new rows' counts less its old rows': two scans, no join (transition tables
    # have no index, and a join of a million rows to a million would take minutes).
    moved = " OR ".join(f"sum({s}) <> 0" for s in STATUSES)
    return [
        f"""
        CREATE FUNCTION archfarm_tasks_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            WITH changed ({names}) AS (
                SELECT n.job_id, {signed("n", "")}, (n.stage IS NOT DISTINCT FROM 'final')::int, n.started_at
                FROM new_rows n
            )
            {upsert()}
            RETURN NULL;
        END $$;
        """,
        f"""
        CREATE FUNCTION archfarm_tasks_updated() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            WITH changed ({names}) AS (
                SELECT n.job_id, {signed("n", "")}, 0, CASE WHEN n.status = 'running' THEN n.started_at END
                FROM new_rows n
                UNION ALL
                SELECT o.job_id, {signed("o", "-")}, 0, NULL FROM old_rows o
            )
            {upsert(f"HAVING {moved}")}
            RETURN NULL;
        END $$;
        """,
        """
        CREATE FUNCTION archfarm_artifacts_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO job_counts AS c (job_id, images)
            SELECT job_id, count(*) FROM new_rows GROUP BY job_id ORDER BY job_id
            ON CONFLICT (job_id) DO UPDATE SET images = c.images + excluded.images;
            RETURN NULL;
        END $$;
        """,
        "CREATE TRIGGER tasks_inserted AFTER INSERT ON tasks REFERENCING NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION archfarm_tasks_inserted()",
        "CREATE TRIGGER tasks_updated AFTER UPDATE ON tasks REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION archfarm_tasks_updated()",
        "CREATE TRIGGER artifacts_inserted AFTER INSERT ON artifacts REFERENCING NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION archfarm_artifacts_inserted()",
    ]


def _sqlite() -> list[str]:
    changes = ", ".join(f"{s} = {s} + (NEW.status = '{s}') - (OLD.status = '{s}')" for s in STATUSES)
    return [
        f"""
        CREATE TRIGGER tasks_inserted AFTER INSERT ON tasks BEGIN
            INSERT INTO job_counts (job_id, {", ".join(STATUSES)}, finals, images, started_at)
            VALUES (NEW.job_id, {", ".join(f"NEW.status = '{s}'" for s in STATUSES)},
                    coalesce(NEW.stage = 'final', 0), 0, NEW.started_at)
            ON CONFLICT (job_id) DO UPDATE SET
                {", ".join(f"{s} = {s} + excluded.{s}" for s in STATUSES)}, finals = finals + excluded.finals,
                started_at = coalesce(min(started_at, excluded.started_at), started_at, excluded.started_at);
        END
        """,
        f"""
        CREATE TRIGGER tasks_updated AFTER UPDATE OF status ON tasks WHEN OLD.status <> NEW.status BEGIN
            UPDATE job_counts SET {changes},
                started_at = CASE WHEN NEW.status = 'running' AND NEW.started_at IS NOT NULL
                             THEN coalesce(min(started_at, NEW.started_at), NEW.started_at) ELSE started_at END
            WHERE job_id = NEW.job_id;
        END
        """,
        """
        CREATE TRIGGER artifacts_inserted AFTER INSERT ON artifacts BEGIN
            UPDATE job_counts SET images = images + 1 WHERE job_id = NEW.job_id;
        END
        """,
    ]


def upgrade() -> None:
    # Indexes first: on SQLite, nothing after the triggers may rebuild the tables they are on.
    op.drop_index("ix_tasks_job_status", table_name="tasks")
    op.create_index("ix_tasks_job_status", "tasks", ["job_id", "status", "ordinal"])
    op.create_index("ix_tasks_job_ordinal", "tasks", ["job_id", "ordinal"])
    op.create_index("ix_tasks_finished_at", "tasks", ["finished_at"])
    op.create_index("ix_artifacts_job_style_seed", "artifacts", ["job_id", "style", "seed", "id"])
    op.create_table(
        "job_counts",
        sa.Column("job_id", sa.String(length=36), nullable=False),
        *(sa.Column(status, sa.Integer(), server_default="0", nullable=False) for status in STATUSES),
        sa.Column(
            "finals", sa.Integer(), server_default="0", nullable=False, comment="final tasks a staged job's picks added"
        ),
        sa.Column("images", sa.Integer(), server_default="0", nullable=False, comment="artifacts stored"),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True, comment="when its first task started"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id"),
    )
    op.execute(
        f"""
        INSERT INTO job_counts (job_id, {", ".join(STATUSES)}, finals, images, started_at)
        SELECT t.job_id, {", ".join(f"sum(CASE WHEN t.status = '{s}' THEN 1 ELSE 0 END)" for s in STATUSES)},
               sum(CASE WHEN t.stage = 'final' THEN 1 ELSE 0 END),
               (SELECT count(*) FROM artifacts a WHERE a.job_id = t.job_id), min(t.started_at)
        FROM tasks t GROUP BY t.job_id
        """
    )
    for statement in _postgresql() if _on_postgresql() else _sqlite():
        op.execute(statement)


def downgrade() -> None:
    for trigger, table in (
        ("tasks_inserted", "tasks"),
        ("tasks_updated", "tasks"),
        ("artifacts_inserted", "artifacts"),
    ):
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}" + (f" ON {table}" if _on_postgresql() else ""))
    if _on_postgresql():
        for function in ("archfarm_tasks_inserted", "archfarm_tasks_updated", "archfarm_artifacts_inserted"):
            op.execute(f"DROP FUNCTION IF EXISTS {function}()")
    op.drop_table("job_counts")
    op.drop_index("ix_artifacts_job_style_seed", table_name="artifacts")
    op.drop_index("ix_tasks_finished_at", table_name="tasks")
    op.drop_index("ix_tasks_job_ordinal", table_name="tasks")
    op.drop_index("ix_tasks_job_status", table_name="tasks")
    op.create_index("ix_tasks_job_status", "tasks", ["job_id", "status"])


def _on_postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"
