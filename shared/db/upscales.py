"""An upscale's assembly tasks: one per image, added once every tile of that image has succeeded.

A tile's success and the check for its image's last tile are one transaction that first locks the job's row,
so of two tiles ending at once the later one sees the earlier and adds the assembly: never none, never two
(its id is derived from the image). Tiles of image `k` are the job's tasks with ordinals `k·n … k·n+n-1`
(`n` tiles per image, in the grid's order: `producer.expand.tiles`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db.clock import database_time
from shared.db.models import Artifact, Job, Task, TaskStatus
from shared.db.store import add_tasks


@dataclass(frozen=True)
class TiledImage:
    """The image a tile belongs to, as its assembly task needs it."""

    job_id: str
    image: int
    """Its position among the job's images (its seed's)."""
    images: int
    tiles: int
    """Tiles per image."""
    seed: int
    key: str
    parent: int | None
    """The artifact enlarged, when it is one: the assembled image's parent."""


def lock_job(session: Session, job_id: str) -> None:
    """Hold the job's row to the end of the transaction (before any of its tasks' rows, as a cancel does)."""
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())


def assemble_when_tiled(session: Session, image: TiledImage) -> list[str]:
    """Add the image's assembly task if every one of its tiles has succeeded and its job is not cancelled
    (called after a tile's success, with the job locked by `lock_job`); the ids added now, to be sent."""
    first = image.image * image.tiles
    done = session.scalar(
        select(func.count())
        .select_from(Task)
        .where(
            Task.job_id == image.job_id,
            Task.stage == "tile",
            Task.ordinal.between(first, first + image.tiles - 1),
            Task.status == TaskStatus.SUCCEEDED,
        )
    )
    cancelled = session.scalar(select(Job.cancelled_at).where(Job.id == image.job_id)) is not None
    if done != image.tiles or cancelled:
        return []
    now = database_time(session)
    plan_and_style = (Task.plan_url, Task.plan_name, Task.plan_digest, Task.style)  # its tiles'
    tile = session.execute(select(*plan_and_style).where(Task.job_id == image.job_id, Task.ordinal == first)).one()
    row = {
        "id": assembly_task_id(image.job_id, image.seed),
        "job_id": image.job_id,
        "ordinal": image.images * image.tiles + image.image,
        **tile._asdict(),
        "seeds": [image.seed],
        "outputs": [image.key],
        "stage": "assemble",
        "source_id": image.parent,
        "status": TaskStatus.QUEUED.value,
        "attempts": 0,
        "created_at": now,
        "due_at": now,
    }
    return add_tasks(session, [row])


def assembly_task_id(job_id: str, seed: int) -> str:
    return str(uuid.uuid5(uuid.UUID(job_id), f"assemble:{seed}"))


def tile_artifacts(session: Session, job_id: str, image: int, tiles: int) -> list[tuple[int, int, str]]:
    """(tile index, artifact id, URL) of every rendered tile of the job's `image`-th image, in the grid's order."""
    first = image * tiles
    rows = session.execute(
        select(Task.ordinal, Artifact.id, Artifact.url)
        .join(Artifact, Artifact.task_id == Task.id)
        .where(Task.job_id == job_id, Task.stage == "tile", Task.ordinal.between(first, first + tiles - 1))
        .order_by(Task.ordinal)
    )
    return [(ordinal - first, artifact, url) for ordinal, artifact, url in rows]
