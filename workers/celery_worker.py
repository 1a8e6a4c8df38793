"""The Celery worker process: one per device, concurrency 1, models resident in its pool process.

Contract (tested in tests/test_farm.py):
- CUDA is initialised only in the pool process, after it starts (the launcher and the main process never
  touch it); the pool process dies with its parent (PR_SET_PDEATHSIG), so an orphan never holds a GPU;
- each model is loaded at most once while the process lives; one task runs at a time;
- SIGTERM finishes the current task (Celery's warm shutdown), then hands back anything still held;
  a second SIGINT stops at once, and the task goes back to the queue;
- a killed pool process's task is delivered again at once (`task_reject_on_worker_lost`) and re-claimed by
  the same worker; a killed worker's tasks are re-sent by the reaper of any live worker once its heartbeat
  is older than `ARCHFARM_HEARTBEAT_TIMEOUT`.

Run by `archfarm worker`, which sets `ARCHFARM_WORKER_NODE`, `ARCHFARM_DEVICE` and `CUDA_VISIBLE_DEVICES`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import threading
import time
import uuid

from celery import signals
from celery.app.task import Task as CeleryTask
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from shared.broker import RENDER_TASK, make_celery, messages_for, send_tasks
from shared.config import get_settings
from shared.db.models import Task
from shared.db.session import make_engine, session_factory
from shared.db.store import (
    fail_queued,
    heartbeat,
    reap,
    record_failure,
    register_worker,
    requeue_held,
    stop_worker,
)
from shared.errors import TransientError
from shared.storage import open_storage_from_settings

# Imported before the pool forks (torch and diffusers, not CUDA), so a replacement pool process starts in
# a fraction of a second instead of re-importing them.
from workers.runner import FAILED_ATTEMPTS_LIMIT, FAILED_NODES_LIMIT, Runner

log = logging.getLogger("archfarm.worker")

settings = get_settings()
app = make_celery(settings)
NODE = os.environ.get("ARCHFARM_WORKER_NODE") or f"archfarm-{settings.device}@{socket.gethostname()}"
WORKER_ID = f"{NODE}#{uuid.uuid4().hex[:8]}"
"""One per process start: liveness is judged per incarnation, blocklists per node."""

_engine = make_engine(settings.database_url)
_sessions = session_factory(_engine)
_runner: Runner | None = None
_stop = threading.Event()


def resend(task_ids: list[str], delay: float) -> None:
    send_tasks(app, messages_for(_sessions, settings, task_ids), countdown=delay)


@app.task(
    name=RENDER_TASK,
    bind=True,
    autoretry_for=(TransientError, OperationalError, InterfaceError),
    retry_backoff=5,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=8,
)
def render(self: CeleryTask, task_id: str) -> str | None:
    status = runner().run(task_id)
    return status.value if status is not None else None


def runner() -> Runner:
    """The pool process's runner, created on its first task so CUDA starts in this process only."""
    global _runner
    if _runner is None:
        # Control maps are cached in the shared storage, so each is computed once for the whole farm.
        _runner = Runner(
            settings, _sessions, WORKER_ID, node=NODE, resend=resend, map_storage=open_storage_from_settings(settings)
        )
    return _runner


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, so a pool process never outlives its worker."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        log.warning("cannot set PR_SET_PDEATHSIG; pool processes may outlive a killed worker")


@signals.worker_process_init.connect
def _pool_process_started(**_: object) -> None:
    _die_with_parent()
    _engine.dispose(close=False)  # connections inherited through fork belong to the parent
    # Concurrency is 1: anything this worker still holds was being run (or uploaded) by a pool process
    # that died. Put it back and send it again; a duplicate delivery is harmless.
    # It counts as a failure on this node, so a task that kills its process every time ends up failed.
    with _sessions.begin() as session:
        orphans = requeue_held(session, WORKER_ID)
        for task_id, job_id in session.execute(select(Task.id, Task.job_id).where(Task.id.in_(list(orphans)))):
            reason = "the worker's pool process died while running it"
            nodes, attempts = record_failure(session, task_id, job_id, NODE, reason)
            if nodes >= FAILED_NODES_LIMIT or attempts >= FAILED_ATTEMPTS_LIMIT:
                fail_queued(session, task_id, f"{reason}, {attempts} times on {nodes} workers")
                orphans.remove(task_id)
    if orphans:
        log.warning("re-sending %d task(s) left by a dead pool process", len(orphans))
        resend(orphans, 0)


@signals.worker_process_shutdown.connect
def _pool_process_stopping(**_: object) -> None:
    if _runner is not None:
        _runner.close()


@signals.worker_init.connect
def _worker_started(**_: object) -> None:
    with _sessions.begin() as session:
        register_worker(session, WORKER_ID, NODE, settings.device, os.getpid())
    threading.Thread(target=_heartbeat_loop, name="archfarm-heartbeat", daemon=True).start()


@signals.worker_shutdown.connect
def _worker_stopping(**_: object) -> None:
    _stop.set()
    with _sessions.begin() as session:
        held = requeue_held(session, WORKER_ID)
        stop_worker(session, WORKER_ID)
    if held:
        log.warning("handing back %d task(s) on shutdown", len(held))
        resend(held, 0)


def _heartbeat_loop() -> None:
    """Heartbeat, and reap workers whose heartbeat went stale (any live worker may do it).

    A worker reaps only once its own heartbeats have gone through for a whole timeout: after a database
    outage every heartbeat is stale, and the first worker back must not declare all the others dead.
    """
    healthy_since: float | None = None
    while not _stop.wait(settings.heartbeat_interval):
        try:
            with _sessions.begin() as session:
                alive = heartbeat(session, WORKER_ID)
                healthy_since = healthy_since or time.monotonic()
                steady = time.monotonic() - healthy_since >= settings.heartbeat_timeout
                orphans = reap(session, settings.heartbeat_timeout) if steady else []
            if orphans:
                log.warning("re-sending %d task(s) of dead workers", len(orphans))
                resend(orphans, 0)
            if not alive:
                log.error("declared dead by another worker's reaper; stopping")
                os.kill(os.getpid(), signal.SIGTERM)
        except Exception:  # noqa: BLE001 - a database blip must not kill the heartbeat thread
            healthy_since = None
            log.exception("heartbeat failed")


def main(queues: list[str]) -> None:
    app.worker_main(
        [
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            f"--hostname={NODE}",
            f"--queues={','.join(queues)}",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )
