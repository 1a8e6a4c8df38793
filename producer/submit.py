"""Submission: validate, expand and persist a job in one transaction.

Nothing is stored until the spec, every plan and the output URL have been checked; the job row and all its
task rows are then written together, so a failure leaves nothing half-submitted.
"""

from __future__ import annotations

import json
import uuid
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from sqlalchemy import insert
from sqlalchemy.orm import Session

from producer.expand import TaskSpec, expand
from producer.models import check_licences, pin_models, pin_published
from shared.config import Settings
from shared.db.clock import database_time
from shared.db.models import Task, TaskStatus
from shared.db.notifications import arm
from shared.db.store import add_job
from shared.errors import InvalidInput, SubmitWarning
from shared.images import decode_image
from shared.limits import check_fits_visibility
from shared.packs import pin_style
from shared.plans import load_plan, load_plans, stage_plans
from shared.registry import known_family
from shared.revision import region
from shared.spec import MAX_ECHO, ImageControl, JobSpec, Notify, Profile, Revise, Upscale, parse_model
from shared.storage import Storages, canonical_url


@dataclass(frozen=True)
class PreparedJob:
    """A render job that passed every check: ready to be stored and sent."""

    id: str
    spec: JobSpec
    output_url: str
    queue: str
    tasks: list[TaskSpec]
    owner: str | None = None

    @property
    def task_ids(self) -> list[str]:
        return [task.id for task in self.tasks]

    def persist(self, session: Session) -> None:
        persist(session, self)


def prepare(
    spec: JobSpec,
    settings: Settings,
    *,
    farm: bool = False,
    owner: str | None = None,
    remote: bool = False,
    storages: Storages | None = None,
) -> PreparedJob:
    """Check the plans, control images, models and output URL, and expand the task list; raises `InvalidInput`.
    Models published to storage are pinned by their manifest's hash (`pin_published`). A `remote` job (the
    REST API's) never has a bare model name taken for a folder of this process.

    For a `farm`, local plans and control images are copied into the configured storage once everything has
    been checked, so workers on other machines read the same bytes (content-addressed: stored once); models
    are checked on this machine otherwise, since it is the one that renders.
    """
    if spec.deadline is not None and spec.deadline <= datetime.now(UTC):
        raise InvalidInput(f"deadline: {spec.deadline.isoformat()} has already passed")
    if farm:  # a task outliving the broker's visibility timeout would be delivered twice while it runs
        check_fits_visibility(spec.profile, settings)
    job_id = str(uuid.uuid4())
    output_url = canonical_url(spec.output or f"{settings.storage_url.rstrip('/')}/{job_id}")
    check_output(output_url)
    profile, notices = pin_models(spec.profile, here=not farm, relative=not remote)
    profile = pin_published(profile, settings)
    use = spec.use or settings.use  # the farm's default is taken into the job: its images' use is on record
    notices += check_licences(spec.model_copy(update={"profile": profile}), use, settings)
    for notice in notices:
        warnings.warn(notice, SubmitWarning, stacklevel=2)
    storages = storages or Storages(settings)
    plans = load_plans(spec.plans, storages)
    if farm:
        plans = stage_plans(plans, storages)
    # The farm's default URLs are taken into the job now, so changing them later never reaches stored jobs.
    notify = spec.notify or (Notify(urls=settings.notify_urls) if settings.notify_urls else None)
    profile = _with_control_images(profile, storages, farm)
    revise = None if spec.revise is None else _with_revision_inputs(spec.revise, profile, storages, farm)
    upscale = None if spec.upscale is None else _with_upscale_inputs(spec.upscale, profile, storages, farm)
    styles = [pin_style(style, storages, farm, f"styles.{i}") for i, style in enumerate(spec.resolved_styles)]
    updates = {"profile": profile, "notify": notify, "revise": revise, "upscale": upscale, "use": use, "styles": styles}
    spec = spec.model_copy(update=updates)
    if upscale is not None:  # its result's size is known only now: the spec's checks of it run again
        spec = parse_model(JobSpec, spec.model_dump(mode="json"))
    return PreparedJob(
        id=job_id,
        spec=spec,
        output_url=output_url,
        queue=settings.queue_for(spec.pool),
        tasks=expand(spec, plans, job_id),
        owner=owner,
    )


SYSTEM_FOLDERS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys", "/usr")
"""Where no render belongs: a worker running as root would write into the system."""


def check_output(url: str) -> None:
    """A local output must be a folder archfarm may fill (symlinks already resolved by `canonical_url`): not a
    file or a device such as /dev/null, and nothing under the system's own folders."""
    if not url.startswith("file://"):
        return
    path = Path(url2pathname(urlparse(url).path))
    if any(path == Path(root) or Path(root) in path.parents for root in SYSTEM_FOLDERS):
        raise InvalidInput(f"output: {url[:MAX_ECHO]!r} is a system folder")
    if path.exists() and not path.is_dir():
        raise InvalidInput(f"output: {url[:MAX_ECHO]!r} is not a folder")


def _with_control_images(profile: Profile, storages: Storages, farm: bool) -> Profile:
    """Read and check every `image` unit's map and pin its content hash into the profile (and so into
    every output key), so a map edited later can neither go unnoticed nor overwrite earlier images."""
    units = []
    for unit in profile.controls:
        if isinstance(unit, ImageControl):
            image, _ = load_plan(unit.image, storages)
            if farm:
                (image,) = stage_plans([image], storages)
            unit = unit.model_copy(update={"image": image.url, "image_sha256": image.digest})
        units.append(unit)
    return profile.model_copy(update={"controls": units})


def _with_revision_inputs(revise: Revise, profile: Profile, storages: Storages, farm: bool) -> Revise:
    """Read and check a revision's parent image (the render's size) and mask (some white: something to
    re-render), stage them for a farm and pin their content hashes into the spec, so the revision's keys
    change with them and a worker notices if they change after the submit."""
    (image, image_bytes), (mask, mask_bytes) = load_plan(revise.image, storages), load_plan(revise.mask, storages)
    limit = storages.settings.max_image_pixels
    size = decode_image(image_bytes, image.url, max_pixels=limit).size
    if size != (profile.width, profile.height):
        raise InvalidInput(f"revise.image is {size[0]}×{size[1]}; the profile renders {profile.width}×{profile.height}")
    if not region(decode_image(mask_bytes, mask.url, max_pixels=limit), size).any():
        raise InvalidInput("revise.mask: no white pixel, nothing to re-render (white marks what changes)")
    if farm:
        image, mask = stage_plans([image, mask], storages)
    return revise.model_copy(
        update={"image": image.url, "image_sha256": image.digest, "mask": mask.url, "mask_sha256": mask.digest}
    )


def _with_upscale_inputs(upscale: Upscale, profile: Profile, storages: Storages, farm: bool) -> Upscale:
    """Read and check the image an upscale enlarges, stage it for a farm, and pin its content hash and size
    into the spec, with the tile size for the base's family: the grid, and so the tasks, are fixed at submit."""
    image, data = load_plan(upscale.image, storages)
    size = decode_image(data, image.url, max_pixels=storages.settings.max_image_pixels).size
    if farm:
        (image,) = stage_plans([image], storages)
    pinned = upscale.model_copy(update={"image": image.url, "image_sha256": image.digest, "image_size": list(size)})
    return pinned.with_tiles(known_family(profile.base))


def persist(session: Session, job: PreparedJob) -> None:
    """Job row, task rows and its notifications (armed) in the caller's transaction (the caller commits, then
    enqueues).

    Every task is due now (database clock): one whose message never goes out is found by the sweeper."""
    now = database_time(session)
    add_job(session, job_id=job.id, spec=job.spec, output_url=job.output_url, queue=job.queue, owner=job.owner)
    if job.spec.notify is not None:
        arm(session, job.id, job.spec.notify)
    rows = (
        {
            "id": t.id,
            "job_id": job.id,
            "ordinal": ordinal,
            "plan_url": t.plan.url,
            "plan_name": t.plan.name,
            "plan_digest": t.plan.digest,
            "style": t.style,
            "seeds": list(t.seeds),
            "outputs": list(t.outputs),
            "stage": t.stage,
            "status": TaskStatus.QUEUED.value,
            "attempts": 0,
            "created_at": now,
            "due_at": now,
        }
        for ordinal, t in enumerate(job.tasks)
    )
    if session.get_bind().dialect.name == "postgresql":
        _copy_tasks(session, rows)
    elif job.tasks:
        session.execute(insert(Task), list(rows))


def _copy_tasks(session: Session, rows: Iterable[dict[str, Any]]) -> None:
    """PostgreSQL's COPY: about 5x faster than a multi-row INSERT for the 100k-task jobs farms submit."""
    columns = list(_COPY_COLUMNS)
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy(f"COPY tasks ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([json.dumps(row[c]) if c in ("seeds", "outputs") else row[c] for c in columns])


_COPY_COLUMNS = (
    "id",
    "job_id",
    "ordinal",
    "plan_url",
    "plan_name",
    "plan_digest",
    "style",
    "seeds",
    "outputs",
    "stage",
    "status",
    "attempts",
    "created_at",
    "due_at",
)
