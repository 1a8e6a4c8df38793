"""A task's whole life in a worker process: claim → load → render → upload → settle, in one place.

Transports (a Celery worker process, or the in-process runner of `archfarm render`) only deliver task ids to
`Lifecycle.run` and carry out `send(task_ids, delay)`; every rule about a task's fate is
`workers.policy.decide`, applied here. The contract every transport relies on:

- a task is claimed with a conditional UPDATE, so a duplicate delivery of a task that is done, cancelled or
  held by another worker does nothing;
- every error a task raises (its stored spec not parsing, a device or model that will not load, a render or
  an upload failing) is classified, recorded and decided, and leaves a reason on the task's row;
- outputs go to keys derived from the inputs and the task is marked done only after they exist, so a task
  killed half-way is safely redone and its objects overwritten, never duplicated;
- uploads run on a background thread while the next task renders (at most one behind); `flush()` waits;
- an outcome that cannot be recorded because the database is away is kept and recorded once it is back;
- a message that cannot be sent (broker away) costs nothing: the task is queued in the database with a due
  time, and the sweeper (`workers.upkeep`) sends it again once it is overdue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar, cast

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from shared.db.costs import record_cost
from shared.db.models import Artifact, FailureKind, Job, JobKind, Task, TaskStatus
from shared.db.rerolls import reroll
from shared.db.session import DATABASE_DOWN
from shared.db.stages import advance
from shared.db.store import (
    blocklisted_nodes,
    cancel_task,
    claim_more,
    claim_task,
    fail_queued,
    fail_task,
    failed_on,
    failure_counts,
    finish_task,
    held_by,
    is_cancelled,
    is_paused,
    largest_memory,
    last_error,
    live_nodes,
    mark_ready,
    postpone_task,
    record_artifacts,
    record_failure,
    record_progress,
    requeue_task,
    worker_progress,
)
from shared.db.upscales import TiledImage, assemble_when_tiled, lock_job, tile_artifacts
from shared.dispatch import hold
from shared.errors import ArchfarmError, InputError, InvalidInput, NotFound, PermanentError, TransientError, one_line
from shared.limits import batch_cap
from shared.logs import outage
from shared.spec import JobSpec, Profile, Stage, Style
from shared.storage import Storage
from shared.tiles import image_key
from shared.training import TrainingSpec
from workers.policy import COUNTED, Action, Decision, ErrorKind, History, Limits, decide
from workers.renderer import Prepared, Rendered, Renderer, Source, Work
from workers.training.trainer import Progress as TrainingProgress
from workers.training.trainer import train
from workers.upscales import assemble_image
from workers.warmup import warm

log = logging.getLogger(__name__)
DATABASE = outage("database")

SendFn = Callable[[list[str], float], None]
"""Puts messages for these tasks on their queue, deliverable after `delay` seconds."""
ProgressFn = Callable[[str, int, int], None]
"""Called as (task_id, step, total_steps) while a task renders."""
DoneFn = Callable[[str, TaskStatus], None]
"""Called once a task has reached the state this worker leaves it in."""

CANCEL_POLL_S = 0.5
TRAIN_REPORT_S = 2.0
"""How often a training task writes its progress to its row (and looks for a cancel)."""
CLAIM_PATIENCE_S = 60.0
"""How long a delivery waits for an unreachable database before leaving its task to the sweeper: well
inside any task's time limit, so waiting never gets the process killed."""
DB_RETRY_MAX_S = 5.0
JOB_CACHE = 256
MEMORY_HAND_ON_S = 1.0
"""How long a task a worker's device cannot hold waits before it is offered again: it is not failing, only
looking for a worker large enough, so not the longer wait of a task that failed here."""

T = TypeVar("T")


class Cancelled(ArchfarmError):
    """The job was cancelled while this task was rendering."""


def classify(error: BaseException) -> ErrorKind:
    """The policy's kind for an exception a task raised."""
    if isinstance(error, Cancelled):
        return ErrorKind.CANCELLED
    if isinstance(error, (TransientError, *DATABASE_DOWN)):
        return ErrorKind.TRANSIENT
    if isinstance(error, PermanentError | InvalidInput | NotFound | ValidationError):
        return ErrorKind.PERMANENT
    return ErrorKind.ERROR  # ConfigError included: this node's setup, so another node may do better


@dataclass(frozen=True)
class HandOn:
    """This node may not run the task (blocklisted): send it on for another node after `delay`."""

    delay: float


@dataclass(frozen=True)
class Held:
    """A task this worker has claimed: enough to settle it, whether or not its spec parses, and the rows
    read with the claim (None when recovering a task held by a process that died)."""

    task_id: str
    job_id: str
    task: dict[str, Any] | None = None


class Lifecycle:
    """One per worker process, built once; `run` is called with each task id the transport delivers."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        *,
        worker: str,
        node: str,
        send: SendFn,
        limits: Limits,
        farm_storage: Storage | None = None,
        on_done: DoneFn | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.worker = worker
        self.node = node
        self.send = send
        self.limits = limits
        self.farm_storage = farm_storage
        self.on_done = on_done
        self.renderer: Renderer | None = None
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archfarm-upload")
        self._pending: dict[str, Future[None]] = {}
        self._cache_state: tuple[list[str], int, int] = ([], 0, 0)
        self._jobs: dict[str, _JobInfo] = {}
        self._lock = threading.Lock()  # the render thread and the upload thread both settle tasks
        self._recovery: str | None = None
        self._recovery_lock = threading.Lock()
        self._stacks: dict[tuple[str, Stage | None], int | None] = {}
        """What each job's pass's model stack holds on this device, by (job, pass)."""

    # --- delivery ----------------------------------------------------------------------------------------

    def run(self, task_id: str, progress: ProgressFn | None = None) -> TaskStatus | None:
        """Claim and render one task, with as many more queued tasks of its job as the device's batch takes
        (`batch`: one task per call on a CPU by default); uploads and completion continue in the background
        (see `flush`).

        Returns the delivered task's state as this call leaves it: RUNNING while its upload is pending, None
        when it does not exist or the database stayed unreachable (the sweeper re-sends it). Never raises for
        anything a task did: every error is settled on its task's row.
        """
        try:
            if self._recovery is not None:
                self._finish_recovery(CLAIM_PATIENCE_S)
            if task_id in self._pending:  # a second delivery of a task still uploading: it will find it done
                self._pending[task_id].result(timeout=CLAIM_PATIENCE_S)
            claimed = self._db(lambda session: self._claim(session, task_id), CLAIM_PATIENCE_S)
        except (TimeoutError, *DATABASE_DOWN) as error:
            log.error("task %s: database unreachable (%s); left queued for the sweeper", task_id, one_line(error))
            return None
        if isinstance(claimed, HandOn):
            self._send([task_id], claimed.delay)
            return TaskStatus.QUEUED
        if not isinstance(claimed, Held):
            return claimed
        if self._jobs[claimed.job_id].kind is JobKind.TRAIN:
            return self._train(claimed)
        if claimed.task is not None and claimed.task["stage"] == "assemble":
            return self._assemble(claimed)
        try:
            first = self._prepare(claimed)
        except Exception as error:  # noqa: BLE001 - every failure is settled on the task row
            return self._settle(claimed, error)
        batch = [(claimed, first), *self._gather(claimed, first)]
        try:
            results = self._render([prepared for _, prepared in batch], progress)
        except Exception as error:  # noqa: BLE001 - the whole call failed: each of its tasks is settled
            statuses = [self._settle(held, error) for held, _ in batch]
            return statuses[0]
        for (held, prepared), rendered in zip(batch, results, strict=True):
            self._upload_behind(held, prepared.work, rendered)
        return TaskStatus.RUNNING

    def flush(self) -> None:
        """Wait until every started upload is stored and its task recorded."""
        for future in list(self._pending.values()):
            future.result()
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        self._uploader.shutdown(wait=True)

    def recover_crashed(self, reason: str) -> None:
        """Settle every task this worker still holds as crashed (the pool process that ran them died), before
        this process claims anything.

        Done now if the database answers, else by a background thread as soon as it does; `run` waits for it
        (for a while), so a task claimed by this process is never mistaken for one held by the dead one."""
        self._recovery = reason
        try:
            self._finish_recovery(patience=5.0)
        except (TimeoutError, *DATABASE_DOWN):
            threading.Thread(target=self._finish_recovery, name="archfarm-recover", daemon=True).start()

    def _finish_recovery(self, patience: float | None = None) -> None:
        if not self._recovery_lock.acquire(timeout=-1 if patience is None else patience):
            raise TimeoutError("recovery of the tasks a dead process held is still waiting for the database")
        try:
            if self._recovery is None:
                return
            reason = self._recovery
            held = self._db(lambda session: [Held(t, j) for t, j in held_by(session, self.worker)], patience)
            for task in held:
                log.warning("task %s: %s", task.task_id, reason)
                self._decide(task, ErrorKind.CRASH, reason)
            self._recovery = None
        finally:
            self._recovery_lock.release()

    # --- the stages --------------------------------------------------------------------------------------

    def _claim(self, session: Session, task_id: str) -> Held | HandOn | TaskStatus | None:
        row = session.execute(select(Task.job_id, Task.status, Task.stage).where(Task.id == task_id)).first()
        if row is None:
            return None
        job_id, status, stage = row
        if status is not TaskStatus.QUEUED:
            return TaskStatus(status)
        if is_paused(session, job_id):  # its message is spent: it waits for its turn again once resumed
            hold(session, [task_id])
            return TaskStatus.QUEUED
        if job_id not in self._jobs:
            if len(self._jobs) >= JOB_CACHE:  # a long-lived worker sees many jobs; each is small, but bound them
                self._jobs.clear()
                self._stacks.clear()
            job = session.execute(select(Job.kind, Job.name, Job.output_url, Job.spec).where(Job.id == job_id)).one()
            self._jobs[job_id] = _JobInfo(job.kind, job.name, job.output_url, job.spec)
        if (too_large := self._too_large(session, task_id, job_id, cast(Stage | None, stage))) is not None:
            return too_large
        if self.limits.blocklist_after is not None and (elsewhere := self._elsewhere(session, task_id, job_id)):
            return elsewhere
        if not claim_task(session, task_id, self.worker):
            return TaskStatus(session.scalar(select(Task.status).where(Task.id == task_id)))
        self._progress(session, started=task_id)
        (held,) = self._held(session, job_id, [task_id])
        return held

    def _too_large(
        self, session: Session, task_id: str, job_id: str, stage: Stage | None
    ) -> HandOn | TaskStatus | None:
        """None when this worker's device can hold the task's model stack. Otherwise the task is handed to a
        live worker of its queue that can, or, with none, fails with its job's other queued tasks, saying what
        the stack needs and what the largest worker offers (a larger worker, then `retry`, renders them)."""
        need = self._stack_bytes(task_id, job_id, stage)
        if need is None or need <= self._renderer().memory:
            return None
        queue = session.scalar(select(Job.queue).where(Job.id == job_id)) or ""
        largest = largest_memory(session, queue, self.worker)
        if largest is None or largest >= need:  # one may hold it: a worker that has not said yet may too
            postpone_task(session, task_id, MEMORY_HAND_ON_S)
            return HandOn(MEMORY_HAND_ON_S)
        reason = (
            f"its model stack needs {need / 2**30:.2f} GiB; the largest worker of queue {queue!r} offers "
            f"{max(largest, self._renderer().memory) / 2**30:.2f} GiB"
        )
        log.warning("task %s: %s", task_id, reason)
        fail_task(session, task_id, None, reason)
        fail_queued(session, job_id, reason)
        return TaskStatus.FAILED

    def _stack_bytes(self, task_id: str, job_id: str, stage: Stage | None) -> int | None:
        """What the task's pass's model stack holds on this device (once per job and pass); None for a task
        that loads no stack (training, an assembly) or whose stack cannot be sized here (it loads, or fails,
        as it would have)."""
        job = self._jobs[job_id]
        if job.kind is not JobKind.RENDER or stage == "assemble":
            return None
        key = (job_id, stage)
        if key not in self._stacks:
            try:
                self._stacks[key] = self._renderer().stack_bytes(job.spec_model().stage_profile(stage))
            except Exception as error:  # noqa: BLE001 - sizing is advice: the task loads or fails as before
                log.warning("task %s: cannot size its model stack (%s); claiming it", task_id, one_line(error))
                self._stacks[key] = None
        return self._stacks[key]

    def _elsewhere(self, session: Session, task_id: str, job_id: str) -> HandOn | TaskStatus | None:
        """Whether this node should leave the task to others: it is blocklisted for the job (then the task fails
        when no live node may take it, with the error that blocklisted this one), or the task has already
        raised an error here and a node it has not failed on is live."""
        assert self.limits.blocklist_after is not None  # only asked with a blocklist
        queue = session.scalar(select(Job.queue).where(Job.id == job_id)) or ""
        others = live_nodes(session, queue) - {self.node}
        blocked = blocklisted_nodes(session, job_id, self.limits.blocklist_after)
        if self.node in blocked:
            history = History(open_nodes=len(others - blocked))
            decision = decide(ErrorKind.BLOCKED, history, self.limits, last_error(session, job_id, self.node))
            log.info("task %s: node %s is blocklisted for job %s: %s", task_id, self.node, job_id, decision)
            if decision.action is Action.FAIL:
                fail_task(session, task_id, None, decision.reason)
                return TaskStatus.FAILED
        else:
            tried = failed_on(session, task_id)
            if self.node not in tried or not others - blocked - tried:
                return None
        delay = self.limits.hand_on_delay_s
        postpone_task(session, task_id, delay)
        return HandOn(delay)

    def _work(self, held: Held) -> Work:
        """The claimed task's inputs, its job's spec parsed once per job (pure: nothing on this machine is
        looked at). A spec that no longer parses is a permanent failure of the task, settled like any other."""
        job, task = self._jobs[held.job_id], held.task
        assert task is not None  # `run` only renders what `_claim` read
        spec = job.spec_model()
        stage: Stage | None = task["stage"]
        if stage not in job.profiles:
            job.profiles[stage] = spec.stage_profile(stage)
        upscale = spec.upscale
        return Work(
            task_id=held.task_id,
            job_id=held.job_id,
            job_name=job.name,
            output_url=job.output_url,
            plan_url=task["plan_url"],
            plan_name=task["plan_name"],
            plan_digest=task["plan_digest"],
            style=job.styles[task["style"]],
            seeds=list(task["seeds"]),
            outputs=list(task["outputs"]),
            profile=job.profiles[stage],
            stage=stage,
            source=None if task["source_id"] is None else Source(task["source_id"], task["source_url"]),
            reroll_of=task["reroll_of"],
            strength=_strength(spec, stage),
            revise=spec.revise,
            upscale=upscale,
            tile=task["ordinal"] % upscale.grid().count if upscale is not None and stage == "tile" else None,
        )

    def warm(self, profiles: Sequence[tuple[str, Profile]]) -> None:
        """Compile every batch bucket of each named profile in this process, then record the worker ready
        with what it warmed (`archfarm worker --warm`): its first task of those stacks replays instead of
        tracing and capturing. A profile that fails to warm is logged and left: its tasks compile, or fail,
        on their own."""
        warmed: list[dict[str, Any]] = []
        for name, profile in profiles:
            started = time.perf_counter()
            try:
                buckets = warm(self._renderer(), profile, None, self.settings)
            except Exception as error:  # a worker that cannot warm still serves
                log.exception("warming %s failed; its tasks will compile when they come", name)
                warmed.append({"profile": name, "error": one_line(error)})
                continue
            seconds = time.perf_counter() - started
            log.info("warmed %s: buckets %s in %.1f s", name, [b.images for b in buckets], seconds)
            warmed.append({"profile": name, "buckets": [b.images for b in buckets], "seconds": round(seconds, 1)})
        memory = self._renderer().memory
        self._db(lambda session: mark_ready(session, self.worker, warmed, memory), CLAIM_PATIENCE_S)

    def _renderer(self) -> Renderer:
        """Built by the first task (or warm-up), in the process that renders (CUDA must start after any fork)."""
        if self.renderer is None:
            self.renderer = Renderer(self.settings, self.farm_storage)
        return self.renderer

    def _prepare(self, held: Held) -> Prepared:
        """The task's inputs and control maps; raises for that task alone."""
        return self._renderer().prepare(self._work(held))

    def _gather(self, first: Held, prepared: Prepared) -> list[tuple[Held, Prepared]]:
        """More queued tasks of the same job (one stack and shape) for the same call, up to the images the
        device takes; each prepared on its own, so one whose plan is unreadable fails alone."""
        assert self.renderer is not None  # `_prepare` built it
        profile = prepared.work.profile
        images = self.renderer.images_per_call(profile, batch_cap(profile, self.settings))
        wanted = images // profile.seeds_per_task - 1
        if wanted < 1:
            return []
        try:
            stage = prepared.work.stage
            style = prepared.work.style.name if prepared.work.style.packed else None  # one pack per call
            more = self._db(
                lambda session: self._claim_more(session, first.job_id, wanted, stage, style), CLAIM_PATIENCE_S
            )
        except (TimeoutError, *DATABASE_DOWN):
            return []  # the delivered task alone, then
        batch = []
        for held in more:
            try:
                batch.append((held, self.renderer.prepare(self._work(held))))
            except Exception as error:  # noqa: BLE001 - settled on its own row; the others render
                self._settle(held, error)
        return batch

    def _train(self, held: Held) -> TaskStatus:
        """Run a training task to its end, from its latest checkpoint (`workers.training`): a delivery after a
        crash, a kill or a cancel-then-retry goes on where the run's checkpoints left it."""
        try:
            spec = TrainingSpec.model_validate(self._jobs[held.job_id].spec)
            result = train(spec, self.settings, resume=True, progress=self._training_progress(held))
        except Exception as error:  # noqa: BLE001 - every failure is settled on the task row
            return self._settle(held, error)
        log.info("task %s: trained %d steps, model at %s", held.task_id, result.steps, result.model_url)

        def record(session: Session) -> bool:
            done = finish_task(session, held.task_id, self.worker)
            self._progress(session, finished=held.task_id)
            return done

        if self._db(record, None) and self.on_done is not None:
            self.on_done(held.task_id, TaskStatus.SUCCEEDED)
        return TaskStatus.SUCCEEDED

    def _training_progress(self, held: Held) -> Callable[[TrainingProgress], None]:
        """Writes the run's progress to its task row every few seconds and stops it once its job is cancelled."""
        last = 0.0

        def report(progress: TrainingProgress) -> None:
            nonlocal last
            if time.monotonic() - last < TRAIN_REPORT_S and progress.step < progress.max_steps:
                return
            last = time.monotonic()
            try:
                with self.sessions.begin() as session:
                    record_progress(session, held.task_id, self.worker, asdict(progress))
                    cancelled = is_cancelled(session, held.job_id)
            except DATABASE_DOWN:  # an outage must not cost the run: report again later
                return
            if cancelled:
                raise Cancelled(held.job_id)

        return report

    def _claim_more(
        self, session: Session, job_id: str, limit: int, stage: Stage | None, style: str | None
    ) -> list[Held]:
        return self._held(session, job_id, claim_more(session, job_id, self.worker, limit, stage, style))

    @staticmethod
    def _held(session: Session, job_id: str, ids: list[str]) -> list[Held]:
        """Claimed tasks with the columns a render needs (a final's, the draft it starts from), in the order
        given."""
        columns = (
            *(Task.id, Task.plan_url, Task.plan_name, Task.plan_digest, Task.style, Task.seeds, Task.outputs),
            *(Task.ordinal, Task.stage, Task.source_id, Artifact.url.label("source_url"), Task.reroll_of),
        )
        query = select(*columns).outerjoin(Artifact, Artifact.id == Task.source_id).where(Task.id.in_(ids))
        found = {row.id: row._asdict() for row in session.execute(query)}
        return [Held(task_id, job_id, found[task_id]) for task_id in ids]

    def _render(self, batch: list[Prepared], progress: ProgressFn | None) -> list[Rendered]:
        assert self.renderer is not None  # `_prepare` built it
        rendered = self.renderer.render(batch, self._step_callback(batch[0].work, progress))
        self._cache_state = self.renderer.snapshot()
        return rendered

    def _complete(self, held: Held, work: Work, rendered: Rendered) -> None:
        """Upload every image and sidecar, then record artifacts and mark the task done in one transaction.

        Runs on the upload thread, which nobody awaits for errors: it settles every failure itself."""
        assert self.renderer is not None  # set by the render this upload follows
        deadline, pause = time.monotonic() + self.limits.upload_patience_s, 0.5
        while True:
            try:
                rows = self.renderer.upload(work, rendered)
                break
            except TransientError as error:
                if time.monotonic() + pause > deadline:
                    self._settle(held, error)
                    return
                log.warning("task %s: upload failed, retrying in %.1f s: %s", work.task_id, pause, one_line(error))
                time.sleep(pause)
                pause = min(pause * 2, DB_RETRY_MAX_S)
            except Exception as error:  # noqa: BLE001
                self._settle(held, error)
                return

        job = self._jobs[work.job_id]
        digest, device = work.profile.digest(), self.renderer.device_model

        def record(session: Session) -> tuple[bool, list[str]]:
            if work.tile is not None:
                lock_job(session, work.job_id)  # the job's last tiles may end at once: one adds the assembly
            record_artifacts(session, rows)
            done = finish_task(session, work.task_id, self.worker)
            self._progress(session, finished=work.task_id, images=len(rows) if done else 0)
            if not done:
                return done, []
            record_cost(session, digest, device, rendered.timings["render_s"] / rendered.call["images"])
            if work.tile is not None:
                return done, assemble_when_tiled(session, self._tiled(held, work))
            if job.picks_by_rule:
                return done, advance(session, work.job_id)
            return done, reroll(session, work.job_id, job.spec_model(), work.task_id)

        try:
            done, added = self._db(record, None)  # kept until the database is back: never left running for good
        except Exception:  # not an outage: a bug; the reaper re-runs the task when this worker ends
            log.exception("task %s: rendered and stored, but could not be recorded", work.task_id)
            return
        if added:
            self._send(added, 0.0)
        if done and self.on_done is not None:  # not done: reaped meanwhile, and whoever holds it now reports
            self.on_done(work.task_id, TaskStatus.SUCCEEDED)

    def _tiled(self, held: Held, work: Work) -> TiledImage:
        """The image a tile belongs to."""
        assert held.task is not None and work.upscale is not None  # a claimed tile
        spec, tiles = self._jobs[work.job_id].spec_model(), work.upscale.grid().count
        image, seeds = held.task["ordinal"] // tiles, spec.seed_values()
        return TiledImage(
            job_id=work.job_id,
            image=image,
            images=len(seeds),
            tiles=tiles,
            seed=seeds[image],
            key=image_key(work.outputs[0], work.upscale.format),
            parent=work.upscale.parent,
        )

    def _assemble(self, held: Held) -> TaskStatus:
        """Assemble an upscale's image from its tiles (`workers.upscales`): no model, no device."""
        try:
            work = self._work(held)
            upscale = work.upscale
            assert upscale is not None  # an assembly belongs to an upscale
            tiles = upscale.grid().count
            image = (held.task or {})["ordinal"] - len(self._jobs[held.job_id].spec_model().seed_values()) * tiles
            found = self._db(lambda session: tile_artifacts(session, held.job_id, image, tiles), CLAIM_PATIENCE_S)
            row = assemble_image(self._renderer().storages, work, found)
        except Exception as error:  # noqa: BLE001 - every failure is settled on the task row
            return self._settle(held, error)

        def record(session: Session) -> bool:
            record_artifacts(session, [row])
            done = finish_task(session, held.task_id, self.worker)
            self._progress(session, finished=held.task_id, images=1 if done else 0)
            return done

        log.info("task %s: assembled %s from %d tiles, seam score %.3f", held.task_id, row["url"], tiles, row["seam"])
        if self._db(record, None) and self.on_done is not None:
            self.on_done(held.task_id, TaskStatus.SUCCEEDED)
        return TaskStatus.SUCCEEDED

    def _settle(self, held: Held, error: BaseException) -> TaskStatus:
        kind = classify(error)
        reason = one_line(error)
        if kind in COUNTED:
            log.warning("task %s failed on %s (%s): %s", held.task_id, self.node, kind.value, reason)
        elif isinstance(error, InputError):
            log.warning("task %s failed, with the queued tasks sharing its input: %s", held.task_id, reason)
        try:
            return self._decide(held, kind, reason, error if isinstance(error, InputError) else None)
        except Exception:  # not an outage: a bug; the reaper re-runs the task when this worker ends
            log.exception("task %s: could not record its outcome (%s)", held.task_id, reason)
            return TaskStatus.RUNNING

    def _decide(self, held: Held, kind: ErrorKind, reason: str, shared: InputError | None = None) -> TaskStatus:
        """Record the attempt, decide, apply; then send the task again if it went back to the queue. A failure
        for an input (`shared`) fails the queued tasks sharing it too, with the same reason: each would only
        meet the same error, one node after another."""

        def apply(session: Session) -> tuple[Decision, TaskStatus | None, list[str], list[str]]:
            if kind in COUNTED:
                record_failure(session, held.task_id, held.job_id, self.node, COUNTED[kind], reason)
            decision = decide(kind, _history(session, held.task_id), self.limits, reason)
            siblings: list[str] = []
            if decision.action is Action.FAIL:
                status = TaskStatus.FAILED if fail_task(session, held.task_id, self.worker, decision.reason) else None
                if shared is not None:
                    siblings = fail_queued(session, held.job_id, decision.reason, shared.plan_digest)
            elif decision.action is Action.CANCEL:
                status = TaskStatus.CANCELLED if cancel_task(session, held.task_id, self.worker) else None
            else:
                moved = requeue_task(session, held.task_id, self.worker, decision.delay)
                status = TaskStatus.QUEUED if moved else None
            self._progress(session, finished=held.task_id)
            ended = status in (TaskStatus.FAILED, TaskStatus.CANCELLED)
            # A task recovered after a crash comes without its job read: `advance` then looks for itself.
            picks_by_rule = held.job_id not in self._jobs or self._jobs[held.job_id].picks_by_rule
            return decision, status, siblings, advance(session, held.job_id) if ended and picks_by_rule else []

        with self._lock:
            decision, status, siblings, finals = self._db(apply, None)
        if finals:
            self._send(finals, 0.0)
        if self.on_done is not None:
            for task_id in siblings:
                self.on_done(task_id, TaskStatus.FAILED)
        if status is None:  # no longer ours (reaped meanwhile): whoever holds it now decides
            return TaskStatus.RUNNING
        if status is TaskStatus.QUEUED:
            self._send([held.task_id], decision.delay)
        if self.on_done is not None:
            self.on_done(held.task_id, status)
        return status

    # --- plumbing ----------------------------------------------------------------------------------------

    def _send(self, task_ids: list[str], delay: float) -> None:
        try:
            self.send(task_ids, delay)
        except Exception as error:  # noqa: BLE001 - the task is queued in the database: the sweeper sends it
            log.warning("could not send %d task(s), left to the sweeper: %s", len(task_ids), one_line(error))

    def _db(self, work: Callable[[Session], T], patience: float | None) -> T:
        """`work` in a transaction, retried while the database is unreachable, for up to `patience` seconds
        (None: for ever). A task's outcome must not be lost to an outage: it waits here until it is recorded."""
        deadline = None if patience is None else time.monotonic() + patience
        pause = 0.25
        while True:
            try:
                with self.sessions.begin() as session:
                    done = work(session)
            except DATABASE_DOWN as error:
                DATABASE.failed(error)
                if deadline is not None and time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, DB_RETRY_MAX_S)
            else:
                DATABASE.answered()
                return done

    def _upload_behind(self, held: Held, work: Work, rendered: Rendered) -> None:
        """Queue the upload behind the one before, once that one is done: at most one task's images wait in
        memory. Only a database outage keeps an upload from finishing (its task cannot be recorded); then
        this one queues anyway after a while, as no further task can be claimed until the database is back."""
        for done in [t for t, f in self._pending.items() if f.done()]:
            del self._pending[done]
        try:
            for future in list(self._pending.values()):
                future.result(timeout=CLAIM_PATIENCE_S)  # never raises for the task: _complete settles it
        except TimeoutError:
            log.warning("task %s: the upload before it is still waiting for the database", held.task_id)
        self._pending[held.task_id] = self._uploader.submit(self._complete, held, work, rendered)

    def _progress(
        self, session: Session, *, started: str | None = None, finished: str | None = None, images: int = 0
    ) -> None:
        """Report to the worker row; the cache's state is the snapshot the render thread last took, so the
        upload thread never walks the cache while the next render changes it."""
        models, loads, swaps = self._cache_state
        worker_progress(
            session,
            self.worker,
            started=started,
            finished=finished,
            models=models,
            images=images,
            loads=loads,
            swaps=swaps,
        )

    def _step_callback(self, work: Work, progress: ProgressFn | None) -> Callable[[int, int], None]:
        """Reports progress and stops the render at the next step once the job is cancelled: looked up at the
        first step (a short render would otherwise never look), then every `CANCEL_POLL_S`."""
        last_poll = -CANCEL_POLL_S

        def on_step(step: int, total: int) -> None:
            nonlocal last_poll
            if progress is not None:
                progress(work.task_id, step, total)
            if time.monotonic() - last_poll >= CANCEL_POLL_S:
                last_poll = time.monotonic()
                try:
                    with self.sessions() as session:
                        cancelled = is_cancelled(session, work.job_id)
                except DATABASE_DOWN:  # an outage must not cost the render: check again at a later step
                    return
                if cancelled:
                    raise Cancelled(work.job_id)

        return on_step


@dataclass
class _JobInfo:
    """A job as a worker needs it; its spec is parsed by the first task rendered from it."""

    kind: JobKind
    name: str
    output_url: str
    spec: dict[str, Any]
    render: JobSpec | None = None
    profiles: dict[Stage | None, Profile] = field(default_factory=dict)
    """Per pass of a staged job (None: a single-pass job's)."""
    styles: dict[str, Style] = field(default_factory=dict)

    def spec_model(self) -> JobSpec:
        """The job's render spec, parsed on first use."""
        if self.render is None:
            self.render = JobSpec.model_validate(self.spec)
            self.styles = {style.name: style for style in self.render.resolved_styles}
        return self.render

    @property
    def picks_by_rule(self) -> bool:
        """A staged job whose drafts a rule picks: each of its tasks that ends may be the one to run the rule."""
        return (self.spec.get("pick") or {}).get("by") == "adherence"


def _strength(spec: JobSpec, stage: Stage | None) -> float | None:
    """How much of its start a task renders again: a final at its job's strength, a revision's region whole;
    None for a render from noise."""
    if spec.revise is not None:
        return 1.0
    if stage == "tile" and spec.upscale is not None:
        return spec.upscale.strength
    return spec.final.strength if stage == "final" and spec.final else None


def _history(session: Session, task_id: str) -> History:
    counts = failure_counts(session, task_id)
    return History(
        errors=counts.attempts.get(FailureKind.ERROR, 0),
        error_nodes=counts.nodes.get(FailureKind.ERROR, 0),
        crashes=counts.attempts.get(FailureKind.CRASH, 0),
        crash_nodes=counts.nodes.get(FailureKind.CRASH, 0),
        transients=counts.attempts.get(FailureKind.TRANSIENT, 0),
        transient_s=counts.age_s.get(FailureKind.TRANSIENT, 0.0),
    )
