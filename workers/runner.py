"""Running one task: claim it, render its seeds, upload images and sidecars, then mark it done.

The contract every execution path (in-process or a Celery worker) relies on:
- a task is claimed with a conditional UPDATE, so a duplicate delivery of a task that is running or done
  does nothing;
- outputs are written to keys derived from the inputs before the task is marked done, so a task killed
  half-way is safely redone and its objects overwritten, never duplicated;
- models stay resident in the process's `ModelCache` across tasks.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from shared.db.models import Job, Task, TaskStatus
from shared.db.store import claim_task, fail_task, finish_task, is_cancelled, record_artifacts, release_task
from shared.errors import ArchfarmError, InvalidInput, PermanentError, TransientError
from shared.images import content_hash, decode_image
from shared.spec import Profile, Style
from shared.storage import Storage, open_storage, read_url
from workers.engine.models import ModelCache, default_dtype, pick_device
from workers.engine.pipeline import ControlInput, render
from workers.engine.presets import default_controlnet
from workers.preprocessors import control_map
from workers.sidecar import sidecar

ProgressFn = Callable[[str, int, int], None]
"""Called as (task_id, step, total_steps) while a task renders."""

CANCEL_POLL_S = 0.5


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


class Runner:
    """One per worker process: holds the model cache and storage clients across tasks."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], worker: str) -> None:
        self.settings = settings
        self.sessions = sessions
        self.worker = worker
        self.device = pick_device(settings.device)
        self.cache = ModelCache(settings.models_dir, self.device, default_dtype(self.device))
        self._storages: dict[str, Storage] = {}

    def run(self, task_id: str, progress: ProgressFn | None = None) -> TaskStatus:
        """Execute one task to a terminal state (or hand it back on a transient error, re-raised)."""
        with self.sessions.begin() as session:
            if not claim_task(session, task_id, self.worker):
                return session.scalar(select(Task.status).where(Task.id == task_id)) or TaskStatus.FAILED
            work = _load_work(session, task_id)
        try:
            rows = self._render(work, progress)
        except Cancelled:
            return self._release(task_id, TaskStatus.CANCELLED)
        except TransientError:
            self._release(task_id, TaskStatus.QUEUED)
            raise
        except (PermanentError, InvalidInput) as e:
            return self._fail(task_id, str(e))
        except Exception as e:  # a bug or a library error: keep the reason on the row, do not kill the worker
            return self._fail(task_id, f"{type(e).__name__}: {e}")
        with self.sessions.begin() as session:
            record_artifacts(session, rows)
            finish_task(session, task_id, self.worker)
        return TaskStatus.SUCCEEDED

    def _release(self, task_id: str, status: TaskStatus) -> TaskStatus:
        with self.sessions.begin() as session:
            release_task(session, task_id, self.worker, status)
        return status

    def _fail(self, task_id: str, reason: str) -> TaskStatus:
        with self.sessions.begin() as session:
            fail_task(session, task_id, self.worker, reason)
        return TaskStatus.FAILED

    def storage(self, url: str) -> Storage:
        if url not in self._storages:
            self._storages[url] = open_storage(
                url, endpoint_url=self.settings.s3_endpoint_url, region=self.settings.s3_region
            )
        return self._storages[url]

    def _render(self, work: Work, progress: ProgressFn | None) -> list[dict[str, Any]]:
        timings: dict[str, float] = {}
        started = time.perf_counter()
        data = read_url(work.plan_url, endpoint_url=self.settings.s3_endpoint_url, region=self.settings.s3_region)
        if content_hash(data) != work.plan_digest:
            raise PermanentError(f"{work.plan_url}: the plan changed after the job was submitted")
        plan = decode_image(data, work.plan_url, max_pixels=self.settings.max_image_pixels)
        profile = work.profile
        controls = [
            ControlInput(
                model=unit.model or default_controlnet(profile.base, unit.kind),
                image=control_map(unit, plan, profile.width, profile.height),
                scale=unit.scale,
                start=unit.start,
                end=unit.end,
            )
            for unit in profile.controls
        ]
        timings["preprocess_s"] = time.perf_counter() - started

        started = time.perf_counter()
        result = render(
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
        )
        timings["render_s"] = time.perf_counter() - started

        models = {
            "base": self.cache.identity(profile.base),
            "controlnets": [self.cache.identity(c.model) for c in controls],
        }
        storage = self.storage(work.output_url)
        rows = []
        for seed, key, image in zip(work.seeds, work.outputs, result.images, strict=True):
            rows.append(self._upload(work, storage, seed, key, image, models, result.scheduler, dict(timings)))
        return rows

    def _upload(
        self,
        work: Work,
        storage: Storage,
        seed: int,
        key: str,
        image: Image.Image,
        models: dict[str, Any],
        scheduler: dict[str, Any],
        timings: dict[str, float],
    ) -> dict[str, Any]:
        started = time.perf_counter()
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)  # level 1: a quarter of the time of 6, ~10% larger
        png = buffer.getvalue()
        timings["encode_s"] = time.perf_counter() - started
        side_key = key.removesuffix(".png") + ".json"
        meta = sidecar(
            job={"id": work.job_id, "name": work.job_name},
            task_id=work.task_id,
            plan={"file": work.plan_url.rsplit("/", 1)[-1], "url": work.plan_url, "sha256": work.plan_digest},
            style=work.style.model_dump(),
            seed=seed,
            profile=work.profile.model_dump(mode="json"),
            models=models,
            scheduler=scheduler,
            device=str(self.device),
            timings=timings,
            image_sha256=hashlib.sha256(png).hexdigest(),
        )
        started = time.perf_counter()
        storage.put(key, png, "image/png")
        storage.put(side_key, json.dumps(meta, indent=2).encode(), "application/json")
        timings["upload_s"] = time.perf_counter() - started
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


def _load_work(session: Session, task_id: str) -> Work:
    task = session.get_one(Task, task_id)
    job = session.get_one(Job, task.job_id)
    spec = job.spec
    style = next(Style.model_validate(s) for s in spec["styles"] if s["name"] == task.style)
    return Work(
        task_id=task.id,
        job_id=job.id,
        job_name=job.name,
        output_url=job.output_url,
        plan_url=task.plan_url,
        plan_digest=task.plan_digest,
        style=style,
        seeds=list(task.seeds),
        outputs=list(task.outputs),
        profile=Profile.model_validate(spec["profile"]),
    )
