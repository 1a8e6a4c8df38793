"""The cost model: GPU-seconds per image, measured by the workers, and the work left in them.

A message is not a unit of work: an SDXL or FLUX image costs 10-50 times an SD 1.5 one. Every worker records
the seconds each call took per image under the profile it rendered (its digest: the stack, size, steps,
sampler and guidance, everything that decides the cost but the batch) and its device model, as a moving
average (`costs`). A job's remaining work is its queued and running images times its profile's cost: the
mean over the devices that measured it, else a prior from the base's family, the size, the steps and the
units, until a worker has measured it. A pool's backlog is the sum over its jobs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db.clock import db_now
from shared.db.models import Cost, Job, JobCounts, JobKind
from shared.db.session import dialect_insert
from shared.registry import known_family
from shared.spec import Profile

SMOOTHING = 0.2
"""The weight of a new measure in the moving average: recent calls count most, one odd call little."""
PRIOR_PER_MEGAPIXEL_STEP = {"sd15": 0.19, "sdxl": 0.16, "flux": 0.51, "flux-control": 0.51, "sd3": 0.34}
"""Seconds per megapixel per step on a data-centre GPU with one control unit: SD 1.5 at 512² and 20 steps
≈ 1 s, SDXL at 1024² and 30 steps ≈ 5 s, FLUX.1 [dev] at 1024² and 28 steps ≈ 15 s, SD 3.5 Large ≈ 10 s."""
PROFILE = Job.spec["profile"].label("profile")
"""A job's stored profile alone: a catalogue job's spec lists thousands of plans that no cost needs."""
PRIOR_PER_UNIT = 0.25
"""Each control unit past the first adds about a quarter (its network runs beside the base at every step)."""


@dataclass(frozen=True)
class Remaining:
    """A job's work left: its images queued or running, and their GPU-seconds."""

    images: int
    seconds: float
    measured: bool
    """Whether the cost is a worker's measure (else the prior)."""


def record_cost(session: Session, profile_digest: str, device: str, seconds_per_image: float) -> None:
    """A call's seconds per image of a profile on a device model, into its moving average."""
    insert = dialect_insert(session, Cost).values(
        profile_digest=profile_digest, device=device, seconds_per_image=seconds_per_image, samples=1
    )
    session.execute(
        insert.on_conflict_do_update(
            index_elements=["profile_digest", "device"],
            set_={
                "seconds_per_image": Cost.seconds_per_image * (1 - SMOOTHING)
                + insert.excluded.seconds_per_image * SMOOTHING,
                "samples": Cost.samples + 1,
                "updated_at": db_now(),
            },
        )
    )


def prior(profile: Profile) -> float:
    """Seconds per image of a profile nobody has measured yet."""
    family = known_family(profile.base) or ("sdxl" if profile.width * profile.height >= 1024 * 1024 else "sd15")
    per_step = PRIOR_PER_MEGAPIXEL_STEP[family] * profile.width * profile.height / 1e6
    return per_step * profile.steps * (1 + PRIOR_PER_UNIT * max(0, len(profile.controls) - 1))


def remaining(session: Session, job_ids: list[str] | None = None) -> dict[str, Remaining]:
    """Every unfinished render job's work left (of `job_ids`, or all), by job id."""
    query = (
        select(Job.id, PROFILE, JobCounts.queued + JobCounts.running)
        .join(JobCounts, JobCounts.job_id == Job.id)
        .where(Job.kind == JobKind.RENDER, JobCounts.queued + JobCounts.running > 0)
    )
    if job_ids is not None:
        query = query.where(Job.id.in_(job_ids))
    rows = session.execute(query).all()
    costs = _per_task(session, {job_id: profile for job_id, profile, _ in rows})
    return {
        job_id: Remaining(tasks * cost.images, tasks * cost.seconds, cost.measured)
        for job_id, _, tasks in rows
        if (cost := costs.get(job_id)) is not None
    }


def per_task(session: Session, job_ids: Iterable[str]) -> dict[str, float]:
    """GPU-seconds of one task of each render job (its images times its profile's cost per image); a training
    job's tasks are left out (0): one runs for hours on a GPU of its own, ordered by priority alone."""
    ids = list(job_ids)
    rows = session.execute(select(Job.id, PROFILE).where(Job.id.in_(ids), Job.kind == JobKind.RENDER))
    costs = _per_task(session, {job_id: profile for job_id, profile in rows})
    return {job_id: costs[job_id].seconds if job_id in costs else 0.0 for job_id in ids}


class _Task(NamedTuple):
    seconds: float
    images: int
    measured: bool
    """Whether a worker measured its cost (else the prior)."""


def _per_task(session: Session, stored: dict[str, dict[str, Any]]) -> dict[str, _Task]:
    """One task of each render job: its GPU-seconds, its images and whether they were measured; a job whose
    stored profile this version no longer reads is left out (it costs nothing here, and fails where it runs)
    rather than stopping every estimate of the farm."""
    profiles: dict[str, Profile] = {}
    for job_id, data in stored.items():
        try:
            profiles[job_id] = Profile.model_validate(data)
        except ValidationError:
            continue
    measured = _measured(session, {profile.digest() for profile in profiles.values()})
    found = {}
    for job_id, profile in profiles.items():
        cost = measured.get(profile.digest())
        per_image = prior(profile) if cost is None else cost
        found[job_id] = _Task(profile.seeds_per_task * per_image, profile.seeds_per_task, cost is not None)
    return found


def backlog(session: Session, held_owners: Iterable[str] = ()) -> dict[str, float]:
    """GPU-seconds of work a worker could take per broker queue (a pool's): running tasks, and queued ones
    but those of paused jobs and of owners held by their quota (`held_owners`), which no new worker would
    get, so an autoscaler keeps no GPU up for them."""
    held = set(held_owners)
    rows = session.execute(
        select(Job.id, Job.queue, Job.owner, Job.paused_at, PROFILE, JobCounts.queued, JobCounts.running)
        .join(JobCounts, JobCounts.job_id == Job.id)
        .where(Job.kind == JobKind.RENDER, JobCounts.queued + JobCounts.running > 0)
    ).all()
    costs = _per_task(session, {row.id: row.profile for row in rows})
    totals: dict[str, float] = defaultdict(float)
    for row in rows:
        if row.id not in costs:
            continue
        takeable = row.paused_at is None and (row.owner or "") not in held
        totals[row.queue] += costs[row.id].seconds * (row.running + (row.queued if takeable else 0))
    return dict(totals)


def _measured(session: Session, digests: set[str]) -> dict[str, float]:
    """The mean over device models of each profile's measured seconds per image."""
    rows = session.execute(
        select(Cost.profile_digest, func.avg(Cost.seconds_per_image))
        .where(Cost.profile_digest.in_(digests))
        .group_by(Cost.profile_digest)
    )
    return {digest: float(seconds) for digest, seconds in rows}
