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

import io
import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from PIL import Image
from sqlalchemy import select, text
from sqlalchemy.exc import SQLAlchemyError

from producer import reads
from producer.database import open_database
from producer.kinds import prepare_for_farm
from producer.sheet import Sheet
from producer.views import ArtifactView, JobView, WorkerView
from shared.broker import make_celery, messages_for, send_tasks
from shared.config import Settings
from shared.db import stages
from shared.db.models import Job
from shared.db.notifications import rearm
from shared.db.shares import check_quota
from shared.db.status import JobStatus
from shared.db.store import (
    cancel_job,
    close_gate,
    is_paused,
    pause_job,
    resume_job,
    retry_job,
    set_priority,
)
from shared.db.tokens import Caller, caller_of
from shared.dispatch import top_up
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
from shared.kinds import Packs, Spec, load_spec, parse_spec
from shared.packs import load_pack
from shared.plans import store_input
from shared.sidecar import Sidecar
from shared.spec import JobSpec, Style, parse_model
from shared.storage import Storage, Storages
from shared.thumbnails import CONTENT_TYPE, thumbnail, thumbnail_key, thumbnail_of_png
from shared.training import TrainingSpec

if TYPE_CHECKING:
    from celery import Celery

    from producer.local import Embedded


log = logging.getLogger(__name__)

Part = Literal["image", "thumbnail", "sidecar"]

READINESS_PREFIX = "readyz/"
"""Listed by the readiness probe: a prefix nothing is stored under, so the answer is empty and quick."""
OPEN_STORAGES = 32
"""Storages kept open by one `Farm` (an API process serves many jobs' outputs over its life)."""


MAX_REVISION_SEEDS = 64
"""Variants one revision renders at most."""


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
        """Validate, store the job and its tasks in one transaction, then send the first window of them
        (`shared.dispatch`: the workers' heartbeats send the rest as they go); returns the job id.

        `job`: a spec of any kind (`shared.kinds`), a document naming its `kind` (render when it names none), or a
        file. Nothing is stored when validation fails. `on_stored(job_id, tasks)` is called as soon as the job is
        stored, before its messages go out. A broker that refuses the messages is a `SubmitWarning`, not an
        error: the tasks are stored and the workers send them once the broker is back. Without a broker a render
        job is rendered here and now; other kinds run on a farm's workers only (`archfarm train SPEC` trains in
        this process). A `remote` job (the REST API's, checked by `producer.remote`) never has a model name taken
        for a folder relative to this process.
        """
        spec = _as_spec(job, self.pack)
        if self._celery is None:
            if not isinstance(spec, JobSpec):
                raise ConfigError(
                    f"a {spec.kind} job runs on a farm's workers (set ARCHFARM_BROKER_URL); `archfarm train SPEC` "
                    "trains in this process"
                )
            stored = None if on_stored is None else (lambda job: on_stored(job.id, len(job.tasks)))
            return self._embedded_farm().render(spec, on_prepared=stored).job_id
        with self.sessions() as session:
            check_quota(session, self.settings, owner)
        prepared = prepare_for_farm(spec, self.settings, owner=owner, remote=remote)
        with self.sessions.begin() as session:
            prepared.persist(session)
        if on_stored is not None:
            on_stored(prepared.id, len(prepared.task_ids))
        try:
            self._dispatch([prepared.queue])
        except BrokerUnavailable as error:
            warnings.warn(
                f"job {prepared.id} is stored with {len(prepared.task_ids)} task(s), but {error}; workers send them "
                f"once the broker is back (or run `archfarm retry {prepared.id}`)",
                SubmitWarning,
                stacklevel=2,
            )
        return prepared.id

    def status(self, job_id: str, *, brief: bool = False) -> JobView:
        """The job's view; NotFound for an unknown id, also for one that is not an id at all. `brief`: without
        its failures and consistency, as lists of jobs show it."""
        with self.sessions() as session:
            return reads.job_view(
                session,
                job_id,
                self.settings.heartbeat_timeout,
                self.settings.blocklist_after or None,
                farm=self._celery is not None,
                brief=brief,
            )

    def resolve(self, job_id: str) -> str:
        """The full id of the job that `job_id` names: a whole id, or its first characters (`reads.resolve`)."""
        with self.sessions() as session:
            return reads.resolve(session, job_id)

    def jobs(
        self, limit: int = 50, offset: int = 0, status: JobStatus | None = None, after: str | None = None
    ) -> list[JobView]:
        """Recent jobs, newest first; with `status`, only the jobs in that status; by `offset` or after the job
        `after` (a cursor: pages stay steady while jobs are added). Each view is brief: without its failures and
        consistency (ask for the job)."""
        with self.sessions() as session:
            ids = reads.job_ids(session, limit, offset, status, after)
        return [self.status(job_id, brief=True) for job_id in ids]

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 1.0) -> JobView:
        """Block until the job is finished (any terminal outcome), waits for a pick, or `timeout` seconds pass."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            view = self.status(job_id)
            if view.status.still or (deadline is not None and time.monotonic() >= deadline):
                return view
            time.sleep(poll)

    def cancel(self, job_id: str) -> int | None:
        """Queued tasks never start; running ones stop at their next step. Returns the tasks cancelled now,
        or None for a job that had already finished (it keeps the status it ended with)."""
        self.status(job_id)
        with self.sessions.begin() as session:
            return cancel_job(session, job_id)

    def retry(self, job_id: str) -> int:
        """Requeue failed and cancelled tasks and let every queued task take its turn again; returns how many
        are queued. The job's notifications start afresh when something is requeued.

        Sending tasks that are already queued again is harmless (a task is claimed once) and repairs a submit
        whose sending was cut off by a broker outage.
        """
        self.status(job_id)
        self._broker("retry")
        with self.sessions.begin() as session:
            rearm(session, job_id)
            queued = retry_job(session, job_id)
        self._dispatch([self._queue(job_id)])
        return len(queued)

    def pause(self, job_id: str) -> bool:
        """Queued tasks wait, running ones finish; False when the job was paused already."""
        self.status(job_id)
        self._broker("pause")
        with self.sessions.begin() as session:
            return pause_job(session, job_id)

    def pick(self, job_id: str, artifact_ids: Sequence[int] = (), *, done: bool = False) -> list[str]:
        """Pick drafts of a staged job waiting for picks: each renders its final (sent to the farm, or rendered
        here and now without a broker); `done` closes the gate after them, and the job ends with its finals.
        Returns the final tasks added."""
        self.status(job_id)
        with self.sessions.begin() as session:
            finals = stages.pick(session, job_id, artifact_ids) if artifact_ids else []
            if done and not close_gate(session, job_id) and not artifact_ids:
                raise InvalidInput(f"job {job_id} takes no picks: its picks are closed or it has no stages")
        if self._celery is None:
            self._embedded_farm().run(job_id, finals)
        else:
            send_tasks(self._celery, messages_for(self.sessions, self.settings, finals))
        return finals

    def revision(
        self,
        artifact_id: int,
        mask: str | Path | Image.Image,
        *,
        prompt: str | None = None,
        seeds: int = 1,
        feather: int = 8,
    ) -> JobSpec:
        """The job that renders only `mask`'s white region of an image again (and a `feather` band around it),
        every pixel beyond the band the parent's own: `seeds` variants from the image's seed on, with its plan,
        profile and style (its prompt replaced by `prompt`), read from its sidecar, written beside the parent in
        its job's output. `mask`: a path or URL, or an image (stored in the farm's inputs). Submit it to render
        it."""
        if not 1 <= seeds <= MAX_REVISION_SEEDS:
            raise InvalidInput(f"seeds: {seeds} is not 1 to {MAX_REVISION_SEEDS}")
        view = self.artifact(artifact_id)
        meta = Sidecar.model_validate_json(self.read(view, "sidecar"))
        if isinstance(mask, Image.Image):
            png = io.BytesIO()
            mask.convert("L").save(png, format="PNG")
            mask = store_input(png.getvalue(), ".png", self.storages.open())
        return self._made_from(
            view,
            meta,
            name=f"revision-{artifact_id}",
            styles=[{**meta.style, "prompt": prompt} if prompt else meta.style],
            seeds=list(range(meta.seed, meta.seed + seeds)),
            revise={"image": view.url, "mask": str(mask), "feather": feather, "parent": artifact_id},
        )

    def upscaling(
        self,
        artifact_id: int,
        *,
        long_side: int | None = None,
        scale: float | None = None,
        tile: int | None = None,
        overlap: int | None = None,
        strength: float = 0.35,
        format: str = "png",
        plan_units: bool = True,
    ) -> JobSpec:
        """The job that enlarges an image to `long_side` (or `scale` times) tile by tile, each tile rendered
        again with the image's plan, profile, style and seed (read from its sidecar) under a tile ControlNet,
        written beside it in its job's output (under `upscales/`). Submit it to render it."""
        view = self.artifact(artifact_id)
        upscale = {
            "image": view.url,
            "parent": artifact_id,
            "strength": strength,
            "format": format,
            "plan_units": plan_units,
            **{name: value for name, value in (("long_side", long_side), ("scale", scale)) if value is not None},
            **{name: value for name, value in (("tile", tile), ("overlap", overlap)) if value is not None},
        }
        meta = Sidecar.model_validate_json(self.read(view, "sidecar"))
        return self._made_from(view, meta, name=f"upscale-{artifact_id}", upscale=upscale)

    def _made_from(self, view: ArtifactView, meta: Sidecar, **fields: Any) -> JobSpec:
        """A child job of an image: its plan, style, seed and profile (from its sidecar), written beside it in
        its job's output; `fields` add to them or replace them."""
        document = {
            "plans": [meta.plan.url],
            "styles": [meta.style],
            "seeds": [meta.seed],
            "profile": meta.profile,
            "output": self.status(view.job_id).output_url,
        }
        spec: JobSpec = parse_model(JobSpec, {**document, **fields})
        return spec

    def resume(self, job_id: str) -> int:
        """Let a paused job's queued tasks take their turn; returns how many were sent now."""
        self.status(job_id)
        self._broker("resume")
        with self.sessions.begin() as session:
            resume_job(session, job_id)
        return self._dispatch([self._queue(job_id)])

    def set_priority(self, job_id: str, priority: int) -> int:
        """The job's priority (0-100, higher first) for its queued tasks; returns how many were sent now."""
        if not 0 <= priority <= 100:
            raise InvalidInput(f"priority must be 0-100, not {priority}")
        self.status(job_id)
        self._broker("reprioritise")
        with self.sessions.begin() as session:
            set_priority(session, job_id, priority)
            paused = is_paused(session, job_id)
        return 0 if paused else self._dispatch([self._queue(job_id)])

    def _queue(self, job_id: str) -> str:
        with self.sessions() as session:
            return session.scalar(select(Job.queue).where(Job.id == job_id)) or self.settings.queue

    def _dispatch(self, queues: list[str]) -> int:
        """Top `queues` up to their windows (`shared.dispatch`) and send what that took; how many were sent."""
        with self.sessions.begin() as session:
            taken = top_up(session, self.settings, queues)
        return send_tasks(self._broker("send tasks"), messages_for(self.sessions, self.settings, taken))

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
            return reads.worker_views(session, self.settings.heartbeat_timeout)

    def _embedded_farm(self) -> Embedded:
        """The in-process farm that renders here when no broker is configured (models stay loaded across jobs)."""
        from producer.local import Embedded

        if self._embedded is None:
            self._embedded = Embedded(self.settings, self.sessions)
        return self._embedded

    def _broker(self, action: str) -> Celery:
        if self._celery is None:
            raise ConfigError(f"no broker configured: set ARCHFARM_BROKER_URL to {action} on the farm")
        return self._celery

    def results(
        self, job_id: str, offset: int = 0, limit: int | None = None, after: int | None = None, tiles: bool = False
    ) -> list[ArtifactView]:
        """The job's images, `limit` of them (all by default) from `offset` or after the image `after`, in a
        stable order (style, seed); an upscale's tiles too with `tiles`."""
        with self.sessions() as session:
            reads.job_row(session, job_id)  # NotFound for an unknown job, not an empty list
            return reads.artifact_views(session, job_id, offset, limit, after, tiles)

    def artifact(self, artifact_id: int) -> ArtifactView:
        with self.sessions() as session:
            return reads.artifact_view(session, artifact_id)

    def lineage(self, artifact_id: int) -> tuple[list[ArtifactView], list[ArtifactView]]:
        """The image's ancestors, oldest first, and the images made from it (`reads.lineage`)."""
        with self.sessions() as session:
            return reads.lineage(session, artifact_id)

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
        with self.sessions() as session:
            url = reads.plan_url(session, job_id, digest)
        settings = self.settings
        try:
            data = self.storages.read(url, max_bytes=settings.max_plan_bytes)
        except (FileNotFoundError, PermissionError, InvalidInput):
            raise NotFound(f"job {job_id}: plan {digest[:12]} is no longer readable where it was stored") from None
        if content_hash(data) != digest:
            raise NotFound(f"job {job_id}: plan {digest[:12]} has changed since the job was submitted")
        return thumbnail(decode_image(data, digest[:12], max_pixels=settings.max_image_pixels))

    def pack(self, name: str) -> Style | None:
        """The style pack stored under `name` in the farm's storage (`shared.packs`), or None."""
        return load_pack(self.storages.open(), name)

    def sheet(
        self, job_id: str, row_offset: int = 0, rows: int | None = None, seed_offset: int = 0, seeds: int | None = None
    ) -> Sheet:
        """A page of the job's contact sheet (`reads.sheet_page`)."""
        with self.sessions() as session:
            return reads.sheet_page(session, job_id, row_offset, rows, seed_offset, seeds)

    def _output(self, job_id: str) -> tuple[Storage, str]:
        """The job's output storage and the URL prefix its keys follow."""
        with self.sessions() as session:
            url = session.scalar(select(Job.output_url).where(Job.id == job_id))
        if url is None:
            raise NotFound(f"no job {job_id!r}")
        return self.storages.open(url), url.rstrip("/") + "/"

    def download(self, job_id: str, folder: Path) -> list[Path]:
        """Copy every image the job delivers (all but those a re-roll superseded) and its sidecar into `folder`,
        keeping their relative keys."""
        storage, prefix = self._output(job_id)
        written: list[Path] = []
        for artifact in self.results(job_id):
            if artifact.superseded_by is not None:
                continue
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


def _as_spec(job: Spec | Mapping[str, Any] | str | Path, packs: Packs) -> Spec:
    """A spec of any kind: given, a document naming its kind, or a file holding one (style names looked up
    in `packs` first)."""
    if isinstance(job, JobSpec | TrainingSpec):
        return job
    if isinstance(job, str | Path):
        return load_spec(Path(job), packs)
    return parse_spec(dict(job), packs=packs)
