"""Running one task: claim it, render its seeds, then upload, record and mark it done.

The contract every execution path (in-process or a Celery worker) relies on:
- a task is claimed with a conditional UPDATE, so a duplicate delivery of a task that is done, cancelled or
  held by another worker does nothing;
- outputs go to keys derived from the inputs and the task is marked done only after they exist, so a task
  killed half-way is safely redone and its objects overwritten, never duplicated;
- models stay resident in the process's `ModelCache` across tasks;
- uploads run on a background thread while the next task renders (at most one behind), so PNG encoding and
  storage latency stay off the GPU's critical path; `flush()` waits for them.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import EllipsisType
from typing import Any

from PIL import Image
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from shared.db.models import Job, Task, TaskStatus
from shared.db.store import (
    blocklisted_nodes,
    claim_task,
    fail_task,
    finish_task,
    is_cancelled,
    live_nodes,
    record_artifacts,
    record_failure,
    release_task,
    worker_progress,
)
from shared.errors import ArchfarmError, InvalidInput, PermanentError, TransientError
from shared.images import content_hash, decode_image
from shared.spec import Profile, Style
from shared.storage import Storage, open_storage, read_url
from workers.engine.compile import CompileOptions
from workers.engine.models import ModelCache, default_dtype, pick_device
from workers.engine.pipeline import ControlInput, RenderResult, render
from workers.engine.presets import default_controlnet
from workers.preprocessors import ControlMaps
from workers.sidecar import sidecar

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
"""Called as (task_id, step, total_steps) while a task renders."""
DoneFn = Callable[[str, TaskStatus], None]
"""Called once a task has reached the state this runner leaves it in."""
ResendFn = Callable[[list[str], float], None]
"""Sends tasks again (ids, delay in seconds): set by distributed workers, absent in-process."""

CANCEL_POLL_S = 0.5
FAILED_NODES_LIMIT = 3
"""A task that failed on this many different nodes fails for good."""
FAILED_ATTEMPTS_LIMIT = 5
"""... and so does one that failed this many times in all (a farm of one or two workers)."""
BLOCKLIST_LIMIT = 3
"""A node that failed this many tasks of a job stops taking that job's tasks."""
BLOCKED_DELAY_S = 5.0
TRANSIENT_ATTEMPTS_LIMIT = 10
"""A task handed back this many times for transient reasons (storage, database) fails: a misconfigured
bucket must not keep a GPU re-rendering the same images for ever."""


class Cancelled(ArchfarmError):
    """The job was cancelled while this task was rendering."""


@dataclass(frozen=True)
class Work:
    """What a claimed task needs, copied out of the database so no session is held while rendering."""

    task_id: str
    job_id: str
    job_name: str
    output_url: str
    plan_url: str
    plan_digest: str
    style: Style
    seeds: list[int]
    outputs: list[str]
    profile: Profile
    attempts: int


@dataclass(frozen=True)
class Rendered:
    images: list[Image.Image]
    scheduler: dict[str, Any]
    models: dict[str, Any]
    timings: dict[str, float]


class Runner:
    """One per worker process: holds the model cache, storage clients and the upload thread across tasks."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        worker: str,
        *,
        node: str | None = None,
        resend: ResendFn | None = None,
        on_done: DoneFn | None = None,
        map_storage: Storage | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.worker = worker
        self.node = node or worker
        self.resend = resend
        self.on_done = on_done
        self.device = pick_device(settings.device)
        self.cache = ModelCache(
            settings.models_dir,
            self.device,
            default_dtype(self.device),
            controlnet_budget_bytes=settings.controlnet_cache_bytes,
            offload_budget_bytes=settings.offload_cache_bytes,
        )
        self.maps = ControlMaps(
            map_storage, settings.models_dir, self.device, read=self._read, max_pixels=settings.max_image_pixels
        )
        self._storages: dict[str, Storage] = {}
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archfarm-upload")
        self._pending: Future[None] | None = None
        self._pending_id: str | None = None
        self._cache_state: tuple[list[str], int, int] = ([], 0, 0)
        self._jobs: dict[str, tuple[Profile, dict[str, Style]]] = {}

    def run(self, task_id: str, progress: ProgressFn | None = None) -> TaskStatus | None:
        """Render one task; its upload and completion continue in the background (see `flush`).

        Returns the task's state as this call leaves it: RUNNING while its upload is pending, None when the
        task no longer exists. A TransientError is re-raised after handing the task back, for a retry.
        """
        if task_id == self._pending_id:
            # A second delivery of the task still uploading: let it finish, and the claim below sees it done.
            self._wait_for_upload()
        with self.sessions.begin() as session:
            job_id = session.scalar(select(Task.job_id).where(Task.id == task_id))
            if job_id is None:
                return None
            blocked = self.resend is not None and self.node in (
                excluded := blocklisted_nodes(session, job_id, BLOCKLIST_LIMIT)
            )
            if blocked and not live_nodes(session) - excluded:
                if claim_task(session, task_id, self.worker):
                    fail_task(session, task_id, self.worker, "every live worker is blocklisted for this job")
                return TaskStatus.FAILED
            if not blocked:
                if not claim_task(session, task_id, self.worker):
                    return session.scalar(select(Task.status).where(Task.id == task_id))
                work = _load_work(session, task_id, self._jobs)
                self._progress(session, current_task=task_id)
        if blocked:
            log.info("task %s: this node is blocklisted for job %s, handing it on", task_id, job_id)
            self.resend([task_id], BLOCKED_DELAY_S)  # type: ignore[misc]
            return TaskStatus.QUEUED
        try:
            rendered = self._render(work, progress)
        except Exception as e:  # noqa: BLE001 - every failure is settled on the task row
            return self._settle(work, e)
        self._wait_for_upload()
        self._pending = self._uploader.submit(self._complete, work, rendered)
        self._pending_id = work.task_id
        return TaskStatus.RUNNING

    def flush(self) -> None:
        """Wait until every started upload is stored and its task recorded."""
        self._wait_for_upload()

    def close(self) -> None:
        self.flush()
        self._uploader.shutdown(wait=True)

    def _wait_for_upload(self) -> None:
        if self._pending is not None:
            try:
                self._pending.result()
            finally:
                self._pending, self._pending_id = None, None

    def _settle(self, work: Work, error: Exception) -> TaskStatus:
        """Put a task that did not complete where it belongs: cancelled, handed back, retried elsewhere, or failed."""
        task_id = work.task_id
        if isinstance(error, Cancelled):
            return self._leave(task_id, TaskStatus.CANCELLED)
        if isinstance(error, TransientError | OperationalError | InterfaceError):
            if work.attempts >= TRANSIENT_ATTEMPTS_LIMIT:
                reason = f"gave up after {work.attempts} attempts: {type(error).__name__}: {error}"
                return self._leave(task_id, TaskStatus.FAILED, reason.splitlines()[0])
            self._leave(task_id, TaskStatus.QUEUED)
            raise TransientError(str(error).splitlines()[0]) from error
        reason = str(error) if isinstance(error, ArchfarmError) else f"{type(error).__name__}: {error}"
        if isinstance(error, PermanentError | InvalidInput) or self.resend is None:
            return self._leave(task_id, TaskStatus.FAILED, reason)
        log.warning("task %s failed on %s: %s", task_id, self.node, reason)
        with self.sessions.begin() as session:
            nodes, attempts = record_failure(session, task_id, work.job_id, self.node, reason)
        if nodes >= FAILED_NODES_LIMIT or attempts >= FAILED_ATTEMPTS_LIMIT:
            return self._leave(
                task_id, TaskStatus.FAILED, f"failed {attempts} times on {nodes} workers, last: {reason}"
            )
        status = self._leave(task_id, TaskStatus.QUEUED)
        self.resend([task_id], 0)
        return status

    def _leave(self, task_id: str, status: TaskStatus, reason: str = "") -> TaskStatus:
        with self.sessions.begin() as session:
            if status is TaskStatus.FAILED:
                fail_task(session, task_id, self.worker, reason)
            else:
                release_task(session, task_id, self.worker, status)
            self._progress(session, current_task=None)
        if self.on_done is not None:
            self.on_done(task_id, status)
        return status

    def _progress(self, session: Session, *, current_task: str | None | EllipsisType = ..., images: int = 0) -> None:
        """Report to the worker row; the cache's state is the snapshot the render thread last took, so the
        upload thread never walks the cache while the next render changes it."""
        models, loads, swaps = self._cache_state
        worker_progress(
            session, self.worker, current_task=current_task, models=models, images=images, loads=loads, swaps=swaps
        )

    def _snapshot_cache(self) -> None:
        self._cache_state = (self.cache.resident(), sum(self.cache.loads.values()), self.cache.swaps)

    def storage(self, url: str) -> Storage:
        if url not in self._storages:
            self._storages[url] = open_storage(
                url, endpoint_url=self.settings.s3_endpoint_url, region=self.settings.s3_region
            )
        return self._storages[url]

    def _render(self, work: Work, progress: ProgressFn | None) -> Rendered:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        profile = work.profile
        plan = functools.cache(lambda: self._plan(work))  # read and decoded only if a map must be computed
        controls = [
            ControlInput(
                model=unit.model or default_controlnet(profile.base, unit.kind),
                image=self.maps.get(unit, work.plan_digest, plan, profile.base, profile.width, profile.height),
                scale=unit.scale,
                start=unit.start,
                end=unit.end,
            )
            for unit in profile.controls
        ]
        timings["preprocess_s"] = time.perf_counter() - started

        started = time.perf_counter()
        result: RenderResult = render(
            self.cache,
            base=profile.base,
            controls=controls,
            prompt=work.style.prompt,
            negative_prompt=work.style.negative_prompt,
            seeds=work.seeds,
            steps=profile.steps,
            guidance_scale=profile.guidance_scale,
            width=profile.width,
            height=profile.height,
            scheduler=profile.scheduler,
            on_step=self._step_callback(work, progress),
            vae=profile.vae,
            quantize=None if profile.quantize == "none" else profile.quantize,
            compile=CompileOptions(mode=profile.compile_mode, backend=profile.compile_backend)
            if profile.compile
            else None,
        )
        timings["render_s"] = time.perf_counter() - started
        self._snapshot_cache()
        models: dict[str, Any] = {
            "base": self.cache.identity(profile.base),
            "controlnets": [self.cache.identity(c.model) for c in controls],
        }
        if profile.vae is not None:
            models["vae"] = self.cache.identity(profile.vae)
        return Rendered(list(result.images), result.scheduler, models, timings)

    def _plan(self, work: Work) -> Image.Image:
        data = self._read(work.plan_url)
        if content_hash(data) != work.plan_digest:
            raise PermanentError(f"{work.plan_url}: the plan changed after the job was submitted")
        return decode_image(data, work.plan_url, max_pixels=self.settings.max_image_pixels)

    def _read(self, url: str) -> bytes:
        return read_url(url, endpoint_url=self.settings.s3_endpoint_url, region=self.settings.s3_region)

    def _complete(self, work: Work, rendered: Rendered) -> None:
        """Upload every image and sidecar, then record artifacts and mark the task done in one transaction.

        Runs on the upload thread, which nobody awaits for errors: it settles every failure itself and never
        raises, so one bad upload cannot wedge the worker."""
        try:
            storage = self.storage(work.output_url)
            rows = [
                self._upload(work, storage, seed, key, image, rendered)
                for seed, key, image in zip(work.seeds, work.outputs, rendered.images, strict=True)
            ]
            with self.sessions.begin() as session:
                record_artifacts(session, rows)
                done = finish_task(session, work.task_id, self.worker)
                self._progress(session, images=len(rows) if done else 0)
            if self.on_done is not None:
                self.on_done(work.task_id, TaskStatus.SUCCEEDED)
        except Exception as error:  # noqa: BLE001
            try:
                self._settle(work, error)
            except TransientError:
                if self.resend is not None:
                    self.resend([work.task_id], BLOCKED_DELAY_S)
            except Exception:  # noqa: BLE001 - database or broker away too: the reaper or a retry takes over
                log.exception("task %s: could not record its failure", work.task_id)

    def _upload(
        self, work: Work, storage: Storage, seed: int, key: str, image: Image.Image, rendered: Rendered
    ) -> dict[str, Any]:
        timings = dict(rendered.timings)
        started = time.perf_counter()
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)  # level 1: a quarter of the time of 6, ~10% larger
        png = buffer.getvalue()
        timings["encode_s"] = time.perf_counter() - started
        side_key = key.removesuffix(".png") + ".json"
        meta = sidecar(
            job={"id": work.job_id, "name": work.job_name},
            task_id=work.task_id,
            key=key,
            batch_seeds=work.seeds,
            plan={"file": work.plan_url.rsplit("/", 1)[-1], "url": work.plan_url, "sha256": work.plan_digest},
            style=work.style.model_dump(),
            seed=seed,
            profile=work.profile.model_dump(mode="json"),
            models=rendered.models,
            scheduler=rendered.scheduler,
            device=str(self.device),
            timings=timings,
            image_sha256=hashlib.sha256(png).hexdigest(),
        )
        storage.put(key, png, "image/png")
        storage.put(side_key, json.dumps(meta, indent=2).encode(), "application/json")
        return {
            "job_id": work.job_id,
            "task_id": work.task_id,
            "plan_digest": work.plan_digest,
            "style": work.style.name,
            "seed": seed,
            "url": storage.url(key),
            "sidecar_url": storage.url(side_key),
            "width": image.width,
            "height": image.height,
            "size_bytes": len(png),
        }

    def _step_callback(self, work: Work, progress: ProgressFn | None) -> Callable[[int, int], None]:
        """Reports progress and stops the render at the next step once the job is cancelled."""
        last_poll = time.monotonic()

        def on_step(step: int, total: int) -> None:
            nonlocal last_poll
            if progress is not None:
                progress(work.task_id, step, total)
            if time.monotonic() - last_poll >= CANCEL_POLL_S:
                last_poll = time.monotonic()
                with self.sessions() as session:
                    if is_cancelled(session, work.job_id):
                        raise Cancelled(work.job_id)

        return on_step


def _load_work(session: Session, task_id: str, jobs: dict[str, tuple[Profile, dict[str, Style]]]) -> Work:
    task = session.get_one(Task, task_id)
    job = session.get_one(Job, task.job_id)
    if job.id not in jobs:
        if len(jobs) >= 256:  # a long-lived worker sees many jobs; each is small, but keep them bounded
            jobs.clear()
        # Parsed once per job and worker: a job's spec never changes, and validating it (model references
        # included) on every task would sit on the render's critical path.
        spec = job.spec
        styles = {s["name"]: Style.model_validate(s) for s in spec["styles"]}
        jobs[job.id] = (Profile.model_validate(spec["profile"]), styles)
    profile, styles = jobs[job.id]
    return Work(
        task_id=task.id,
        job_id=job.id,
        job_name=job.name,
        output_url=job.output_url,
        plan_url=task.plan_url,
        plan_digest=task.plan_digest,
        style=styles[task.style],
        seeds=list(task.seeds),
        outputs=list(task.outputs),
        profile=profile,
        attempts=task.attempts,
    )
