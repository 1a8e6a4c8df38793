"""The Python API for programs that submit work: the same operations as the CLI.

    farm = Farm()                      # settings from ARCHFARM_* variables
    job_id = farm.submit("job.yaml")   # validated, stored in one transaction, then enqueued
    view = farm.wait(job_id)
    for artifact in farm.results(job_id): ...

With no broker configured, `submit` renders the job in this process before it returns. What `submit` could
not check or do (a model folder on the workers' disks, a broker that refused the messages) is reported as
a `SubmitWarning` through Python's warnings: the job is stored and will run.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Select, and_, func, or_, select, text, tuple_
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from producer.database import open_database
from producer.kinds import prepare_for_farm
from producer.sheet import Cell, Row, Sheet
from producer.views import ArtifactView, Failure, FailureGroup, JobView, TrainingProgress, WorkerView
from shared.broker import Message, make_celery, messages_for, send_tasks
from shared.config import Settings
from shared.db.clock import database_time
from shared.db.models import Artifact, Job, JobKind, Task, TaskStatus, Worker
from shared.db.notifications import rearm
from shared.db.status import JobStatus, job_status
from shared.db.store import (
    cancel_job,
    first_start,
    pause_job,
    resume_job,
    retry_job,
    serving_workers,
    set_priority,
    status_of,
)
from shared.db.tokens import Caller, caller_of
from shared.errors import (
    ArchfarmError,
    BrokerUnavailable,
    ConfigError,
    InvalidInput,
    NotFound,
    StorageError,
    SubmitWarning,
    one_line,
)
from shared.images import content_hash, decode_image
from shared.kinds import Spec, load_spec, parse_spec, time_limit
from shared.spec import MAX_ECHO, JobSpec
from shared.storage import Storage, Storages
from shared.thumbnails import CONTENT_TYPE, thumbnail, thumbnail_key, thumbnail_of_png
from shared.training import TrainingSpec, model_url

if TYPE_CHECKING:
    from celery import Celery

    from producer.local import Embedded

_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MIN_PREFIX = 4
_ID_PREFIX = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},8}}(-[0-9a-f-]{{0,27}})?")

log = logging.getLogger(__name__)

Part = Literal["image", "thumbnail", "sidecar"]

READINESS_PREFIX = "readyz/"
"""Listed by the readiness probe: a prefix nothing is stored under, so the answer is empty and quick."""
MAX_FAILURES = 100
MAX_FAILURE_GROUPS = 50
"""A job's failed tasks listed one by one, and its (plan, reason) groups: a view stays small however many fail."""
OPEN_STORAGES = 32
"""Storages kept open by one `Farm` (an API process serves many jobs' outputs over its life)."""


class Farm:
    """A connection to the farm's database (and broker, when one is configured)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.engine, self.sessions = open_database(self.settings)
        self._celery = make_celery(self.settings) if self.settings.broker_url else None
        self._embedded: Embedded | None = None
        self.storages = Storages(self.settings, keep=OPEN_STORAGES)
        """Every storage this process reads: the farm's, the jobs' outputs (a dashboard page reads hundreds of
        thumbnails of one job), plans shown beside their renders."""

    def close(self) -> None:
        if self._embedded is not None:
            self._embedded.close()
        self.engine.dispose()

    def __enter__(self) -> Farm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self,
        job: Spec | Mapping[str, Any] | str | Path,
        *,
        on_stored: Callable[[str, int], None] | None = None,
        owner: str | None = None,
        remote: bool = False,
    ) -> str:
        """Validate, store the job and its tasks in one transaction, then send them; returns the job id.

        `job`: a spec of any kind (`shared.kinds`), a document naming its `kind` (render when it names none), or a
        file. Nothing is stored when validation fails. `on_stored(job_id, tasks)` is called as soon as the job is
        stored, before its messages go out (a large job takes a while). A broker that refuses the messages is a
        `SubmitWarning`, not an error: the tasks are stored and the workers' sweeper sends them once the broker
        is back. Without a broker a render job is rendered here and now; other kinds run on a farm's workers
        only (`archfarm train SPEC` trains in this process). A `remote` job (the REST API's, checked by
        `producer.remote`) never has a model name taken for a folder relative to this process.
        """
        spec = _as_spec(job)
        if self._celery is None:
            if not isinstance(spec, JobSpec):
                raise ConfigError(
                    f"a {spec.kind} job runs on a farm's workers (set ARCHFARM_BROKER_URL); `archfarm train SPEC` "
                    "trains in this process"
                )
            from producer.local import Embedded

            if self._embedded is None:
                self._embedded = Embedded(self.settings, self.sessions)
            stored = None if on_stored is None else (lambda job: on_stored(job.id, len(job.tasks)))
            return self._embedded.render(spec, on_prepared=stored).job_id
        limit = time_limit(spec, self.settings)
        prepared = prepare_for_farm(spec, self.settings, owner=owner, remote=remote)
        with self.sessions.begin() as session:
            prepared.persist(session)
        tasks = prepared.task_ids
        if on_stored is not None:
            on_stored(prepared.id, len(tasks))
        messages = (Message(task_id, prepared.id, prepared.queue, spec.priority, limit) for task_id in tasks)
        try:
            send_tasks(self._celery, messages)
        except BrokerUnavailable as error:
            warnings.warn(
                f"job {prepared.id} is stored with {len(tasks)} task(s), but {error}; workers send them once the "
                f"broker is back (or run `archfarm retry {prepared.id}`)",
                SubmitWarning,
                stacklevel=2,
            )
        return prepared.id

    def status(self, job_id: str) -> JobView:
        """The job's view; NotFound for an unknown id, also for one that is not an id at all."""
        _check_id(job_id)
        with self.sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}")
            status, counts = status_of(session, job)
            started, now = first_start(session, job_id)
            timeout = self.settings.heartbeat_timeout
            workers, live = (
                (None, None)
                if self._celery is None
                else (
                    serving_workers(session, job, timeout, self.settings.blocklist_after or None),
                    serving_workers(session, job, timeout, None),
                )
            )
            images_done = session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id))
            failures = [  # a task of a kind other than render names no plan, style or seeds
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
            groups = [
                FailureGroup(plan=plan or "", error=error or "", count=count)
                for plan, error, count in session.execute(
                    select(Task.plan_name, Task.error, func.count())
                    .where(Task.job_id == job_id, Task.status == TaskStatus.FAILED)
                    .group_by(Task.plan_digest, Task.plan_name, Task.error)
                    .order_by(func.count().desc(), func.min(Task.ordinal))
                    .limit(MAX_FAILURE_GROUPS)
                )
            ]
            training = _training(session, job)
        by_value = {s.value: counts.get(s, 0) for s in TaskStatus}
        view = JobView(
            id=job.id,
            name=job.name,
            priority=job.priority,
            status=status,
            counts=by_value,
            total=sum(by_value.values()),
            output_url=job.output_url,
            created_at=job.created_at,
            eta_s=None,
            failures=failures,
            failure_groups=groups,
            workers=workers,
            workers_live=live,
            paused=job.paused_at is not None,
            owner=job.owner,
            pool=job.spec.get("pool"),
            images_total=_images_total(job),
            images_done=images_done or 0,
            training=training,
        )
        return _with_eta(view, started, now)

    def resolve(self, job_id: str) -> str:
        """The full id of the job that `job_id` names: a whole id, or its first characters as the dashboard shows
        them (8), at least `MIN_PREFIX`; NotFound when none matches, InvalidInput when several do."""
        if _JOB_ID.fullmatch(job_id):
            return job_id
        if not _ID_PREFIX.fullmatch(job_id):
            raise NotFound(
                f"no job {job_id[:MAX_ECHO]!r} (give its id, or at least {MIN_PREFIX} of its first characters)"
            )
        with self.sessions() as session:
            found = list(session.scalars(select(Job.id).where(Job.id.startswith(job_id)).limit(2)))
        if not found:
            raise NotFound(f"no job {job_id!r}")
        if len(found) > 1:
            raise InvalidInput(f"{job_id!r} is the start of several jobs' ids: give more of it")
        return found[0]

    def jobs(
        self, limit: int = 50, offset: int = 0, status: JobStatus | None = None, after: str | None = None
    ) -> list[JobView]:
        """Recent jobs, newest first; with `status`, only the jobs in that status. Pages go by `offset` (the
        dashboard's numbered pages) or, steady while jobs are added, by `after`: the last job of the page
        before (a cursor)."""
        newest = select(Job.id, Job.cancelled_at, Job.paused_at).order_by(Job.created_at.desc(), Job.id.desc())
        with self.sessions() as session:
            if after is not None:
                # A cursor that is no job id is refused like an unknown one, without a query.
                found = select(Job.created_at, Job.id).where(Job.id == after)
                anchor = session.execute(found).first() if _JOB_ID.fullmatch(after) else None
                if anchor is None:
                    raise InvalidInput(f"cursor: no job {after[:MAX_ECHO]!r}")
                older = and_(Job.created_at == anchor.created_at, Job.id < anchor.id)
                newest = newest.where(or_(Job.created_at < anchor.created_at, older))
            ids = list(islice(_in_status(session, status, newest), offset, offset + limit))
        return [self.status(job_id) for job_id in ids]

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 1.0) -> JobView:
        """Block until the job is finished (any terminal outcome) or `timeout` seconds pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            view = self.status(job_id)
            if view.status.ended or (deadline is not None and time.monotonic() >= deadline):
                return view
            time.sleep(poll)

    def cancel(self, job_id: str) -> int | None:
        """Queued tasks never start; running ones stop at their next step. Returns the tasks cancelled now,
        or None for a job that had already finished (it keeps the status it ended with)."""
        self.status(job_id)
        with self.sessions.begin() as session:
            return cancel_job(session, job_id)

    def retry(self, job_id: str) -> int:
        """Requeue failed and cancelled tasks and (re)send every queued task; returns how many were sent. The
        job's notifications start afresh when something is requeued.

        Re-sending tasks that are already queued is harmless (a task is claimed once) and repairs a submit
        whose sending was cut off by a broker outage.
        """
        self.status(job_id)
        broker = self._broker("retry")
        with self.sessions.begin() as session:
            rearm(session, job_id)
            queued = retry_job(session, job_id)
        return send_tasks(broker, messages_for(self.sessions, self.settings, queued))

    def pause(self, job_id: str) -> bool:
        """Queued tasks wait, running ones finish; False when the job was paused already."""
        self.status(job_id)
        self._broker("pause")
        with self.sessions.begin() as session:
            return pause_job(session, job_id)

    def resume(self, job_id: str) -> int:
        """Let a paused job's queued tasks run; returns how many were sent."""
        self.status(job_id)
        broker = self._broker("resume")
        with self.sessions.begin() as session:
            queued = resume_job(session, job_id)
        return send_tasks(broker, messages_for(self.sessions, self.settings, queued))

    def set_priority(self, job_id: str, priority: int) -> int:
        """The job's priority (0-100, higher first) for its queued tasks; returns how many were sent again."""
        if not 0 <= priority <= 100:
            raise InvalidInput(f"priority must be 0-100, not {priority}")
        self.status(job_id)
        broker = self._broker("reprioritise")
        with self.sessions.begin() as session:
            queued = set_priority(session, job_id, priority)
        return send_tasks(broker, messages_for(self.sessions, self.settings, queued))

    def caller(self, token: str) -> Caller | None:
        """Who an API token names, or None for an unknown or revoked one."""
        with self.sessions() as session:
            return caller_of(session, token)

    def readiness(self) -> dict[str, str]:
        """Whether the database, the broker and the farm's storage answer now: `ok`, or why not (one line
        each)."""
        checks: dict[str, str] = {}
        try:
            with self.sessions() as session:
                session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except SQLAlchemyError as error:
            checks["database"] = one_line(error)
        if self._celery is not None:
            try:
                with self._celery.connection_for_write() as connection:
                    connection.ensure_connection(max_retries=1, timeout=3)
                checks["broker"] = "ok"
            except Exception as error:  # noqa: BLE001 - kombu raises its own and the transport's errors
                checks["broker"] = one_line(error)
        try:
            self.storages.open().list(READINESS_PREFIX)  # a bucket gone fails as well
            checks["storage"] = "ok"
        except (ArchfarmError, OSError) as error:
            checks["storage"] = one_line(error)
        return checks

    def workers(self) -> list[WorkerView]:
        """Every worker incarnation not stopped long ago, live ones first: what each holds and has done."""
        with self.sessions() as session:
            now = database_time(session)
            rows = session.scalars(
                select(Worker)
                .where(or_(Worker.stopped_at.is_(None), Worker.stopped_at > now - timedelta(hours=1)))
                .order_by(Worker.stopped_at.is_not(None), Worker.node)
            ).all()
            return [WorkerView.of(row, now, self.settings.heartbeat_timeout) for row in rows]

    def _broker(self, action: str) -> Celery:
        if self._celery is None:
            raise ConfigError(f"no broker configured: set ARCHFARM_BROKER_URL to {action} on the farm")
        return self._celery

    def results(
        self, job_id: str, offset: int = 0, limit: int | None = None, after: int | None = None
    ) -> list[ArtifactView]:
        """The job's images, `limit` of them (all by default) from `offset` or after the image `after` (a
        cursor: the last of the page before), in a stable order (style, seed)."""
        self.status(job_id)
        order = (Artifact.style, Artifact.seed, Artifact.id)
        query = (
            select(Artifact, Task.plan_name).join(Task, Task.id == Artifact.task_id).where(Artifact.job_id == job_id)
        )
        with self.sessions() as session:
            if after is not None:
                anchor = session.execute(select(*order).where(Artifact.id == after, Artifact.job_id == job_id)).first()
                if anchor is None:
                    raise InvalidInput(f"cursor: no image {after} in job {job_id}")
                query = query.where(tuple_(*order) > tuple_(*anchor))
            rows = session.execute(query.order_by(*order).offset(offset).limit(limit)).all()
        return [ArtifactView.of(artifact, plan) for artifact, plan in rows]

    def artifact(self, artifact_id: int) -> ArtifactView:
        with self.sessions() as session:
            row = session.execute(
                select(Artifact, Task.plan_name)
                .join(Task, Task.id == Artifact.task_id)
                .where(Artifact.id == artifact_id)
            ).first()
        if row is None:
            raise NotFound(f"no image {artifact_id}")
        return ArtifactView.of(row[0], row[1])

    def read(self, artifact: ArtifactView, part: Part) -> bytes:
        """An image's PNG, thumbnail or sidecar from the job's storage, by the keys the farm recorded for it.

        An image stored before workers wrote thumbnails gets one made from its PNG now, and kept for next time."""
        storage, prefix = self._output(artifact.job_id)
        key = (artifact.sidecar_url if part == "sidecar" else artifact.url).removeprefix(prefix)
        try:
            if part != "thumbnail":
                return storage.get(key)
            try:
                return storage.get(thumbnail_key(key))
            except FileNotFoundError:
                data = thumbnail_of_png(storage.get(key))
        except FileNotFoundError:
            raise NotFound(f"image {artifact.id}: {key} is recorded but missing from storage") from None
        try:
            storage.put(thumbnail_key(key), data, CONTENT_TYPE)
        except StorageError as error:
            log.warning("image %s: could not keep its thumbnail: %s", artifact.id, error)
        return data

    def plan(self, job_id: str, digest: str) -> bytes:
        """A JPEG preview of one of the job's plans, named by its content hash: read from where the job's tasks
        read it (never from a location the caller names), at most `max_plan_bytes`, and only while it still
        holds the content the job was submitted with."""
        _check_id(job_id)
        with self.sessions() as session:
            url = session.scalar(
                select(Task.plan_url).where(Task.job_id == job_id, Task.plan_digest == digest).limit(1)
            )
        if url is None:
            raise NotFound(f"job {job_id} has no plan {digest[:12]}")
        settings = self.settings
        try:
            data = self.storages.read(url, max_bytes=settings.max_plan_bytes)
        except (FileNotFoundError, PermissionError, InvalidInput):
            raise NotFound(f"job {job_id}: plan {digest[:12]} is no longer readable where it was stored") from None
        if content_hash(data) != digest:
            raise NotFound(f"job {job_id}: plan {digest[:12]} has changed since the job was submitted")
        return thumbnail(decode_image(data, digest[:12], max_pixels=settings.max_image_pixels))

    def sheet(
        self, job_id: str, row_offset: int = 0, rows: int | None = None, seed_offset: int = 0, seeds: int | None = None
    ) -> Sheet:
        """A page of the job's contact sheet: `rows` plan × style rows from `row_offset` and `seeds` columns from
        `seed_offset` (None: all of them), each cell with its image or its task's state."""
        _check_id(job_id)
        with self.sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}")
            if job.kind is not JobKind.RENDER:
                raise InvalidInput(f"job {job_id} is a {job.kind.value} job: only render jobs have a contact sheet")
            every_seed = _seeds(job.spec)
            columns = list(every_seed[seed_offset : None if seeds is None else seed_offset + seeds])
            pairs = (
                select(Task.plan_digest, Task.plan_name, Task.style)
                .where(Task.job_id == job_id)
                .group_by(Task.plan_digest, Task.plan_name, Task.style)
            )
            rows_total = session.scalar(select(func.count()).select_from(pairs.subquery())) or 0
            page = session.execute(pairs.order_by(func.min(Task.ordinal)).offset(row_offset).limit(rows)).all()
            digests, styles = {r.plan_digest for r in page}, {r.style for r in page}
            found = select(Artifact, Task.plan_name).join(Task, Task.id == Artifact.task_id)
            found = found.where(
                Artifact.job_id == job_id, Artifact.plan_digest.in_(digests), Artifact.style.in_(styles)
            )
            if seeds is not None:
                found = found.where(Artifact.seed.in_(columns))
            images = {(a.plan_digest, a.style, a.seed): ArtifactView.of(a, plan) for a, plan in session.execute(found)}
            states: dict[tuple[str, str, int], str] = {}
            for digest, style, task_seeds, status in session.execute(
                select(Task.plan_digest, Task.style, Task.seeds, Task.status).where(
                    Task.job_id == job_id,
                    Task.status.in_((TaskStatus.RUNNING, TaskStatus.FAILED, TaskStatus.CANCELLED)),
                    Task.plan_digest.in_(digests),
                    Task.style.in_(styles),
                )
            ):
                states.update({(digest, style, seed): status.value for seed in task_seeds})
        grid = [
            Row(
                plan,
                style,
                [
                    Cell(seed, "rendered", image)
                    if (image := images.get((digest, style, seed)))
                    else Cell(seed, states.get((digest, style, seed), TaskStatus.QUEUED.value))
                    for seed in columns
                ],
                digest,
            )
            for digest, plan, style in page
        ]
        return Sheet(job.id, job.name, columns, grid, row_offset, rows_total, seed_offset, len(every_seed))

    def _output(self, job_id: str) -> tuple[Storage, str]:
        """The job's output storage and the URL prefix its keys follow."""
        with self.sessions() as session:
            url = session.scalar(select(Job.output_url).where(Job.id == job_id))
        if url is None:
            raise NotFound(f"no job {job_id!r}")
        return self.storages.open(url), url.rstrip("/") + "/"

    def download(self, job_id: str, folder: Path) -> list[Path]:
        """Copy every image and sidecar of the job into `folder`, keeping their relative keys."""
        storage, prefix = self._output(job_id)
        written: list[Path] = []
        for artifact in self.results(job_id):
            for url in (artifact.url, artifact.sidecar_url):
                key = url.removeprefix(prefix)
                target = folder / key
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    target.write_bytes(storage.get(key))
                except FileNotFoundError:
                    raise StorageError(f"{url}: recorded but missing from storage") from None
                written.append(target)
        return written


def _check_id(job_id: str) -> None:
    """NotFound for what is not a job id at all, before any query: a NUL or a megabyte of text never reaches
    the database, and the answer echoes a short prefix of it only."""
    if not _JOB_ID.fullmatch(job_id):
        raise NotFound(f"no job {job_id[:MAX_ECHO]!r}")


def _as_spec(job: Spec | Mapping[str, Any] | str | Path) -> Spec:
    """A spec of any kind: given, a document naming its kind, or a file holding one."""
    if isinstance(job, JobSpec | TrainingSpec):
        return job
    if isinstance(job, str | Path):
        return load_spec(Path(job))
    return parse_spec(dict(job))


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
    jobs_query: Select[str, datetime | None, datetime | None],
    chunk: int = 500,
) -> Iterator[str]:
    """Ids of the jobs `jobs_query` lists (id, cancelled_at, paused_at), in its order, those in `status` only
    (all for None). A job's status is derived from its tasks, so it is worked out here for `chunk` jobs per
    query (one grouped count over the tasks index)."""
    seen = 0
    while jobs := session.execute(jobs_query.offset(seen).limit(chunk)).all():
        if status is None:
            yield from (job.id for job in jobs)
            seen += len(jobs)
            continue
        counts: dict[str, dict[TaskStatus, int]] = defaultdict(dict)
        for job_id, task_status, count in session.execute(
            select(Task.job_id, Task.status, func.count())
            .where(Task.job_id.in_([job.id for job in jobs]))
            .group_by(Task.job_id, Task.status)
        ):
            counts[job_id][task_status] = count
        for job in jobs:
            if job_status(counts[job.id], job.cancelled_at is not None, job.paused_at is not None) is status:
                yield job.id
        seen += len(jobs)


def _with_eta(view: JobView, started: datetime | None, now: datetime) -> JobView:
    """Remaining tasks at the rate observed since the first task started (both times the database's)."""
    remaining = view.total - view.done
    if not remaining or not view.done or started is None:
        return view
    elapsed = (now - started).total_seconds()
    return view.model_copy(update={"eta_s": remaining * elapsed / view.done})
