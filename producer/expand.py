"""Expansion: a validated job becomes its complete, inspectable task list before anything runs.

Pure and deterministic: the same job, plans and job id always give the same task ids and output keys.
Output keys are derived from the inputs (plan content, style, seed, profile), so a redelivered or
resubmitted task rewrites the same object instead of adding a new one.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from shared.plans import Plan, output_key
from shared.spec import JobSpec, Stage, Style
from shared.tiles import tile_key, tile_seed


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One unit of work: one plan, one style, a chunk of `seeds_per_task` seeds."""

    id: str
    plan: Plan
    style: str
    seeds: tuple[int, ...]
    outputs: tuple[str, ...]
    """Object key of each seed's PNG, relative to the job's output prefix; the sidecar swaps `.png` for `.json`."""
    stage: Stage | None = None
    """`draft` for a staged job's tasks at submit (its finals are added as drafts are picked)."""


def expand(job: JobSpec, plans: Sequence[Plan], job_id: str) -> list[TaskSpec]:
    """plans × styles × chunks of seeds, plan-major, in the order the job lists them; a staged job's are its
    drafts, under `drafts/`, rendered with the draft's profile; a revision's go under `revisions/`; an
    upscale's are its tiles (`tiles`)."""
    namespace = uuid.UUID(job_id)
    if job.upscale is not None:
        return tiles(job, plans[0], namespace)
    stage: Stage | None = "draft" if job.staged else None
    profile = job.stage_profile(stage)
    profile_digest = profile.digest() if job.revise is None else job.digest()
    folder = f"{stage}s/" if stage else ("revisions/" if job.revise else "")
    size = profile.seeds_per_task
    styles = [(style, style.digest(), _chunks(job.family(style).seeds(), size)) for style in job.resolved_styles]
    tasks: list[TaskSpec] = []
    for plan in plans:
        for style, style_digest, chunks in styles:
            for chunk in chunks:
                tasks.append(
                    TaskSpec(
                        id=str(uuid.uuid5(namespace, f"{plan.digest}:{style.name}:{chunk[0]}")),
                        plan=plan,
                        style=style.name,
                        seeds=chunk,
                        outputs=tuple(
                            folder + output_key(plan, style.name, style_digest, s, profile_digest) for s in chunk
                        ),
                        stage=stage,
                    )
                )
    return tasks


def _chunks(seeds: Sequence[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(seeds[i : i + size]) for i in range(0, len(seeds), size)]


UPSCALES = "upscales/"


def tiles(job: JobSpec, plan: Plan, namespace: uuid.UUID) -> list[TaskSpec]:
    """An upscale's tasks: per seed, one per tile of its image, in the grid's order (so a tile's index is its
    ordinal modulo the grid's count), each under its image's key, rendered with the tile's own seed."""
    assert job.upscale is not None  # only asked of an upscale
    (style,) = job.resolved_styles
    count, style_digest, digest = job.upscale.grid().count, style.digest(), job.digest()
    return [
        TaskSpec(
            id=str(uuid.uuid5(namespace, f"tile:{seed}:{index}")),
            plan=plan,
            style=style.name,
            seeds=(tile_seed(seed, index),),
            outputs=(tile_key(image_key(plan, style, style_digest, seed, digest), index),),
            stage="tile",
        )
        for seed in job.seed_values()
        for index in range(count)
    ]


def image_key(plan: Plan, style: Style, style_digest: str, seed: int, digest: str) -> str:
    """Where an upscale's image is assembled (as PNG; another format swaps the suffix)."""
    return UPSCALES + output_key(plan, style.name, style_digest, seed, digest)
