"""The farm's read queries, one function per view: each takes a session and answers with the typed views of
`producer.views` (a job, a page of jobs, workers, images, a contact sheet). `producer.client.Farm` opens the
session; the CLI, the Python API, the dashboard and the REST API all read through these."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from itertools import islice
from typing import Any

from sqlalchemy import Select, and_, func, or_, select, tuple_
from sqlalchemy.orm import Session

from producer.sheet import Cell, Row, Sheet
from producer.views import (
    ArtifactView,
    Failure,
    FailureGroup,
    JobView,
    StyleConsistency,
    TrainingProgress,
    WorkerView,
)
from shared.consistency import consistency
from shared.db.clock import aware, database_time
from shared.db.costs import remaining
from shared.db.models import Artifact, Job, JobCounts, JobKind, PickGate, Task, TaskStatus, Worker
from shared.db.status import JobStatus
from shared.db.store import job_counts, serving_workers, status_from
from shared.deadlines import forecast
from shared.errors import InvalidInput, NotFound
from shared.spec import MAX_ECHO, SeedFamily
from shared.training import model_url

JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MIN_PREFIX = 4
_ID_PREFIX = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},8}}(-[0-9a-f-]{{0,27}})?")
MAX_FAILURES = 100
MAX_FAILURE_GROUPS = 50
"""A job's failed tasks listed one by one, and its (plan, reason) groups: a view stays small however many fail."""
MAX_LOOKS = 200
"""Images a (pass, style)'s consistency is measured on: enough for its score, read in milliseconds."""
SHEET_STAGES = ("render", "draft", "final", "upscale")
"""The passes whose images are a sheet's cells (an upscale's tiles are not)."""


def check_id(job_id: str) -> None:
    """NotFound for what is not a job id at all, before any query: a NUL or a megabyte of text never reaches
    the database, and the answer echoes a short prefix of it only."""
    if not JOB_ID.fullmatch(job_id):
        raise NotFound(f"no job {job_id[:MAX_ECHO]!r}")


def job_row(session: Session, job_id: str) -> Job:
    """The job's row; NotFound for an unknown id, also for one that is not an id at all."""
    check_id(job_id)
    row = session.get(Job, job_id)
    if row is None:
        raise NotFound(f"no job {job_id!r}")
    return row


def job_view(
    session: Session,
    job_id: str,
    heartbeat_timeout: float,
    blocklist_after: int | None,
    farm: bool,
    brief: bool = False,
) -> JobView:
    """The job's view; NotFound for an unknown id, also for one that is not an id at all. `farm`: workers
    render it (their count is part of the view; without a broker this process renders it). `brief`: as a list
    of jobs shows it, without its failures and consistency (a page lists many jobs; each job's own view has
    them)."""
    row = job_row(session, job_id)
    kept = job_counts(session, job_id)
    counts = kept.by_status()
    status = status_from(row, counts)
    started, now = (None if kept.started_at is None else aware(kept.started_at)), database_time(session)
    workers, live = (
        (
            serving_workers(session, row, heartbeat_timeout, blocklist_after),
            serving_workers(session, row, heartbeat_timeout, None),
        )
        if farm
        else (None, None)
    )
    failures = (
        []
        if brief
        else [  # a task of a kind other than render names no plan, style or seeds
            Failure(
                task=task_id,
                plan=plan or "",
                style=style or "",
                seeds=",".join(map(str, seeds or [])),
                error=error or "",
            )
            for task_id, plan, style, seeds, error in session.execute(
                select(Task.id, Task.plan_name, Task.style, Task.seeds, Task.error)
                .where(Task.job_id == job_id, Task.status == TaskStatus.FAILED)
                .order_by(Task.ordinal)
                .limit(MAX_FAILURES)
            )
        ]
    )
    groups = (
        []
        if brief
        else [
            FailureGroup(plan=plan or "", error=error or "", count=count)
            for plan, error, count in session.execute(
                select(Task.plan_name, Task.error, func.count())
                .where(Task.job_id == job_id, Task.status == TaskStatus.FAILED)
                .group_by(Task.plan_digest, Task.plan_name, Task.error)
                .order_by(func.count().desc(), func.min(Task.ordinal))
                .limit(MAX_FAILURE_GROUPS)
            )
        ]
    )
    by_value = {s.value: counts.get(s, 0) for s in TaskStatus}
    view = JobView(
        id=row.id,
        name=row.name,
        priority=row.priority,
        status=status,
        counts=by_value,
        total=sum(by_value.values()),
        output_url=row.output_url,
        created_at=row.created_at,
        eta_s=None,
        failures=failures,
        failure_groups=groups,
        workers=workers,
        workers_live=live,
        paused=row.paused_at is not None,
        owner=row.owner,
        pool=row.spec.get("pool"),
        images_total=_images_total(row) + kept.finals,
        images_done=kept.images,
        training=_training(session, row),
        pick_gate=row.gate,
        picks_close_at=row.picks_close_at,
        consistency=[] if brief else style_consistency(session, job_id),
        work_left_s=left.seconds if (left := remaining(session, [job_id]).get(job_id)) else None,
        deadline_at=None if row.deadline_at is None else aware(row.deadline_at),
        **({} if brief or not farm or row.deadline_at is None else _deadline(session, row, heartbeat_timeout, status)),
    )
    return _with_eta(view, started, now)


def _deadline(session: Session, row: Job, heartbeat_timeout: float, status: JobStatus) -> dict[str, Any]:
    """The job's forecast finish (`shared.deadlines`) and whether it misses its deadline: by the forecast
    now, or, with none (paused, no live worker), by the one that flagged it."""
    found = forecast(session, heartbeat_timeout, [row.queue]).get(row.id)
    if found is not None:
        return {"expected_at": found.expected_at, "at_risk": found.at_risk}
    return {"at_risk": row.expected_at is not None and not status.ended}


def style_consistency(session: Session, job_id: str) -> list[StyleConsistency]:
    """Each (pass, style) of the job's images: how alike they look, measured on at most `MAX_LOOKS` images
    each (the lowest seeds: a sample of a catalogue job says as much as all of it), read pass by pass and
    style by style through the indexes, so a million-image job costs what its samples cost."""
    spec = session.scalar(select(Job.spec).where(Job.id == job_id)) or {}
    styles = sorted((style for style in spec.get("styles", []) if isinstance(style, dict)), key=lambda s: s["name"])
    found = []
    for style in styles:
        for stage in ("draft", "final") if spec.get("pick") else ("render",):
            members = session.execute(
                select(Artifact.id, Artifact.look)
                .where(Artifact.job_id == job_id, Artifact.style == style["name"], Artifact.stage == stage)
                .where(Artifact.look.is_not(None), Artifact.superseded_by.is_(None))  # a re-roll's others: not views
                .order_by(Artifact.seed, Artifact.id)
                .limit(MAX_LOOKS)
            ).all()
            measured = consistency([signature for _, signature in members], style.get("palette"))
            if measured is not None:
                found.append(
                    StyleConsistency(
                        stage=stage,
                        style=style["name"],
                        score=measured.score,
                        images=len(members),
                        outliers=[members[i][0] for i in measured.outliers],
                        palette=measured.palette,
                    )
                )
    return found


def resolve(session: Session, job_id: str) -> str:
    """The full id of the job that `job_id` names: a whole id, or its first characters as the dashboard shows
    them (8), at least `MIN_PREFIX`; NotFound when none matches, InvalidInput when several do."""
    if JOB_ID.fullmatch(job_id):
        return job_id
    if not _ID_PREFIX.fullmatch(job_id):
        raise NotFound(f"no job {job_id[:MAX_ECHO]!r} (give its id, or at least {MIN_PREFIX} of its first characters)")
    found = list(session.scalars(select(Job.id).where(Job.id.startswith(job_id)).limit(2)))
    if not found:
        raise NotFound(f"no job {job_id!r}")
    if len(found) > 1:
        raise InvalidInput(f"{job_id!r} is the start of several jobs' ids: give more of it")
    return found[0]


def job_ids(session: Session, limit: int, offset: int, status: JobStatus | None, after: str | None) -> list[str]:
    """Recent jobs' ids, newest first; with `status`, only the jobs in that status. Pages go by `offset` (the
    dashboard's numbered pages) or, steady while jobs are added, by `after`: the last job of the page before (a
    cursor)."""
    newest = select(Job.id, Job.cancelled_at, Job.paused_at, Job.gate).order_by(Job.created_at.desc(), Job.id.desc())
    if after is not None:
        # A cursor that is no job id is refused like an unknown one, without a query.
        found = select(Job.created_at, Job.id).where(Job.id == after)
        anchor = session.execute(found).first() if JOB_ID.fullmatch(after) else None
        if anchor is None:
            raise InvalidInput(f"cursor: no job {after[:MAX_ECHO]!r}")
        older = and_(Job.created_at == anchor.created_at, Job.id < anchor.id)
        newest = newest.where(or_(Job.created_at < anchor.created_at, older))
    return list(islice(_in_status(session, status, newest), offset, offset + limit))


def worker_views(session: Session, heartbeat_timeout: float) -> list[WorkerView]:
    """Every worker incarnation not stopped long ago, live ones first: what each holds and has done."""
    now = database_time(session)
    rows = session.scalars(
        select(Worker)
        .where(or_(Worker.stopped_at.is_(None), Worker.stopped_at > now - timedelta(hours=1)))
        .order_by(Worker.stopped_at.is_not(None), Worker.node)
    ).all()
    return [WorkerView.of(row, now, heartbeat_timeout) for row in rows]


def artifact_views(
    session: Session,
    job_id: str,
    offset: int = 0,
    limit: int | None = None,
    after: int | None = None,
    tiles: bool = False,
) -> list[ArtifactView]:
    """The job's images, `limit` of them (all by default) from `offset` or after the image `after` (a cursor:
    the last of the page before), in a stable order (style, seed); an upscale's tiles only when asked."""
    order = (Artifact.style, Artifact.seed, Artifact.id)
    query = select(Artifact, Task.plan_name).join(Task, Task.id == Artifact.task_id).where(Artifact.job_id == job_id)
    if not tiles:
        query = query.where(Artifact.stage != "tile")
    if after is not None:
        anchor = session.execute(select(*order).where(Artifact.id == after, Artifact.job_id == job_id)).first()
        if anchor is None:
            raise InvalidInput(f"cursor: no image {after} in job {job_id}")
        query = query.where(tuple_(*order) > tuple_(*anchor))
    rows = session.execute(query.order_by(*order).offset(offset).limit(limit)).all()
    return [ArtifactView.of(artifact, plan) for artifact, plan in rows]


def artifact_view(session: Session, artifact_id: int) -> ArtifactView:
    row = session.execute(
        select(Artifact, Task.plan_name).join(Task, Task.id == Artifact.task_id).where(Artifact.id == artifact_id)
    ).first()
    if row is None:
        raise NotFound(f"no image {artifact_id}")
    return ArtifactView.of(row[0], row[1])


def lineage(session: Session, artifact_id: int, depth: int = 20) -> tuple[list[ArtifactView], list[ArtifactView]]:
    """An image's ancestors, oldest first (a draft, its final, a revision of that...), and the images made from
    it (finals, revisions); `depth` ancestors at most."""
    ancestors: list[ArtifactView] = []
    parent = session.scalar(select(Artifact.parent_id).where(Artifact.id == artifact_id))
    while parent is not None and len(ancestors) < depth:
        view = artifact_view(session, parent)
        ancestors.insert(0, view)
        parent = view.parent_id
    children = session.execute(
        select(Artifact, Task.plan_name)
        .join(Task, Task.id == Artifact.task_id)
        .where(Artifact.parent_id == artifact_id, Artifact.stage != "tile")
        .order_by(Artifact.id)
        .limit(depth)
    ).all()
    return ancestors, [ArtifactView.of(artifact, plan) for artifact, plan in children]


def plan_url(session: Session, job_id: str, digest: str) -> str:
    """Where the job's tasks read the plan of this content hash; NotFound when it has none."""
    check_id(job_id)
    url = session.scalar(select(Task.plan_url).where(Task.job_id == job_id, Task.plan_digest == digest).limit(1))
    if url is None:
        raise NotFound(f"job {job_id} has no plan {digest[:12]}")
    return url


def sheet_page(
    session: Session,
    job_id: str,
    row_offset: int = 0,
    rows: int | None = None,
    seed_offset: int = 0,
    seeds: int | None = None,
) -> Sheet:
    """A page of the job's contact sheet: `rows` plan × style rows from `row_offset` and `seeds` columns from
    `seed_offset` (None: all of them), each cell with its image or its task's state."""
    row = job_row(session, job_id)
    if row.kind is not JobKind.RENDER:
        raise InvalidInput(f"job {job_id} is a {row.kind.value} job: only render jobs have a contact sheet")
    every_seed = _seeds(row.spec)
    window = slice(seed_offset, None if seeds is None else seed_offset + seeds)
    columns = list(every_seed[window])
    families = {  # a style pack's seed family gives its row seeds of its own
        style["name"]: list(SeedFamily(style["seeds"], len(every_seed)).seeds()[window])
        for style in row.spec["styles"]
        if style.get("seeds")
    }
    # Expansion is plan-major, then style, each pair's tasks together (`producer.expand`): the page's rows are
    # found by the ordinals of their first tasks, through the (job, ordinal) index, whatever the job's size.
    rows_total = len(row.spec["plans"]) * len(row.spec["styles"])
    per_pair = -(-len(every_seed) // row.spec["profile"].get("seeds_per_task", 1))
    start = min(row_offset, rows_total)  # an offset past the end (however far) is an empty page
    wanted = range(start, rows_total if rows is None else min(rows_total, start + rows))
    firsts = [r * per_pair for r in wanted]
    page = session.execute(
        select(Task.plan_digest, Task.plan_name, Task.style)
        .where(Task.job_id == job_id, Task.ordinal.in_(firsts))
        .order_by(Task.ordinal)
    ).all()
    digests, styles = {r.plan_digest for r in page}, {r.style for r in page}
    first_pass = (Task.ordinal >= wanted.start * per_pair, Task.ordinal < wanted.stop * per_pair)
    row_seeds = {style: families.get(style, columns) for style in styles}
    found = select(Artifact, Task.plan_name).join(Task, Task.id == Artifact.task_id)
    found = found.where(Artifact.job_id == job_id, Artifact.plan_digest.in_(digests), Artifact.style.in_(styles))
    found = found.where(Artifact.stage.in_(SHEET_STAGES), Artifact.reroll_of.is_(None))  # a cell: its first image
    if seeds is not None or families:
        found = found.where(Artifact.seed.in_({seed for wanted in row_seeds.values() for seed in wanted}))
    images: dict[tuple[str, str, int], ArtifactView] = {}
    finals: dict[tuple[str, str, int], ArtifactView] = {}
    for artifact, plan in session.execute(found):
        (finals if artifact.stage == "final" else images)[(artifact.plan_digest, artifact.style, artifact.seed)] = (
            ArtifactView.of(artifact, plan)
        )
    kept, rerolls = _rerolls(session, [image.id for image in images.values()])
    states: dict[tuple[str, str, int], str] = {}
    for digest, style, task_seeds, status in session.execute(
        select(Task.plan_digest, Task.style, Task.seeds, Task.status).where(
            Task.job_id == job_id,
            Task.status.in_((TaskStatus.RUNNING, TaskStatus.FAILED, TaskStatus.CANCELLED)),
            *first_pass,  # a cell's state is its first pass's (a draft's, not its final's)
        )
    ):
        states.update({(digest, style, seed): status.value for seed in task_seeds})
    grid = [
        Row(
            plan,
            style,
            [
                Cell(
                    seed,
                    "rendered",
                    kept.get(image.id, image),
                    finals.get((digest, style, seed)),
                    image if image.id in kept else None,
                    rerolls.get(image.id, 0),
                )
                if (image := images.get((digest, style, seed)))
                else Cell(seed, states.get((digest, style, seed), TaskStatus.QUEUED.value))
                for seed in row_seeds[style]
            ],
            digest,
        )
        for digest, plan, style in page
    ]
    picking = row.gate is PickGate.OPEN
    measured = style_consistency(session, job_id)
    firsts = [m for m in measured if m.stage != "final"]  # the cells are the first pass's images
    scores = {m.style: m.score for m in firsts}
    palettes = {m.style: m.palette for m in firsts if m.palette is not None}
    outliers = frozenset(i for m in measured for i in m.outliers)
    return Sheet(
        row.id,
        row.name,
        columns,
        grid,
        row_offset,
        rows_total,
        seed_offset,
        len(every_seed),
        picking,
        consistency=scores,
        outliers=outliers,
        palettes=palettes,
    )


def _rerolls(session: Session, firsts: list[int]) -> tuple[dict[int, ArtifactView], dict[int, int]]:
    """For images rendered with the job's own seeds: the re-roll kept in place of each one a re-roll beat, and
    how many re-rolls each one had (`shared.db.rerolls`)."""
    if not firsts:
        return {}, {}
    chains = select(Artifact.reroll_of, func.count()).where(Artifact.reroll_of.in_(firsts)).group_by(Artifact.reroll_of)
    counts = {first or 0: count for first, count in session.execute(chains)}  # never None: filtered
    query = select(Artifact, Task.plan_name).join(Task, Task.id == Artifact.task_id)
    query = query.where(Artifact.reroll_of.in_(list(counts)), Artifact.superseded_by.is_(None))
    kept = {artifact.reroll_of or 0: ArtifactView.of(artifact, plan) for artifact, plan in session.execute(query)}
    return kept, counts


def _images_total(job: Job) -> int:
    """The images a render job makes (plans × styles × seeds); other kinds make none."""
    if job.kind is not JobKind.RENDER:
        return 0
    return len(job.spec["plans"]) * len(job.spec["styles"]) * len(_seeds(job.spec))


def _training(session: Session, job: Job) -> TrainingProgress | None:
    """A training job's progress as its worker last wrote it, and where its model is published."""
    if job.kind is not JobKind.TRAIN:
        return None
    progress = session.scalar(select(Task.progress).where(Task.job_id == job.id)) or {}
    return TrainingProgress.model_validate({**progress, "model_url": model_url(job.output_url)})


def _seeds(spec: Mapping[str, Any]) -> Sequence[int]:
    """A stored spec's seeds, in order: a `{count, start}` range stays a range (a job may list a million)."""
    seeds = spec["seeds"]
    if isinstance(seeds, Mapping):
        return range(seeds.get("start", 0), seeds.get("start", 0) + seeds["count"])
    return list(seeds)


def _in_status(
    session: Session,
    status: JobStatus | None,
    jobs_query: Select[str, datetime | None, datetime | None, PickGate | None],
    chunk: int = 500,
) -> Iterator[str]:
    """Ids of the jobs `jobs_query` lists (id, cancelled_at, paused_at, gate), in its order, those in `status` only
    (all for None). A job's status is derived from its task counts, so it is worked out here for `chunk` jobs
    per query."""
    seen = 0
    while jobs := session.execute(jobs_query.offset(seen).limit(chunk)).all():
        if status is None:
            yield from (job.id for job in jobs)
            seen += len(jobs)
            continue
        counts = {
            kept.job_id: kept.by_status()
            for kept in session.scalars(select(JobCounts).where(JobCounts.job_id.in_([job.id for job in jobs])))
        }
        for job in jobs:
            if status_from(job, counts.get(job.id, {})) is status:  # type: ignore[arg-type]
                yield job.id
        seen += len(jobs)


def _with_eta(view: JobView, started: datetime | None, now: datetime) -> JobView:
    """Remaining tasks at the rate observed since the first task started (both times the database's)."""
    remaining = view.total - view.done
    if not remaining or not view.done or started is None:
        return view
    elapsed = (now - started).total_seconds()
    return view.model_copy(update={"eta_s": remaining * elapsed / view.done})
