"""The Celery worker process: one per device, concurrency 1, models resident in its pool process.

Celery is only the transport here: its task delivers a task id to the process's `Lifecycle`, which claims,
renders, uploads and settles it; Celery retries nothing itself. Contract (tested in tests/test_farm.py and
tests/chaos/):
- CUDA is initialised only in the pool process, on its first task or while it warms (the launcher and the
  main process never touch it); the pool process dies with its parent (PR_SET_PDEATHSIG), so an orphan never
  holds a GPU;
- a pool process compiles every batch bucket of the worker's `--warm` profiles before it says it is up, so
  Celery hands it no task until then (the main process holds at most one message meanwhile: prefetch 1); the
  worker's row is marked ready, with what it warmed, when it is done;
- each model is loaded at most once while the process lives; one task renders at a time;
- SIGTERM finishes the current task (Celery's warm shutdown); a second SIGINT stops at once; either way the
  launcher hands back whatever the process still held once it has exited;
- a killed pool process's task is delivered again at once (`task_reject_on_worker_lost`); the replacement
  process settles what its predecessor held as a crash (`workers.policy`): retried, and failed only when
  it keeps killing processes on several nodes;
- a killed worker's tasks are handed back by the reaper of any live worker once its heartbeat is older than
  `ARCHFARM_HEARTBEAT_TIMEOUT`; tasks left without a message are re-sent by the sweeper (`workers.upkeep`).
- a job's notifications are fired by whoever settles the task that ends or first fails it, and any event
  a killed worker left unfired or undelivered is sent by the upkeep of any live worker (`workers.notify`).

Run by `archfarm worker`, which checks the schema and the device first and sets `ARCHFARM_WORKER_NODE`,
`ARCHFARM_DEVICE` and `CUDA_VISIBLE_DEVICES`.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import socket
import threading
import time
import uuid

from celery import signals

from shared.broker import RENDER_TASK, make_celery, messages_for, send_tasks
from shared.config import get_settings
from shared.db.models import TaskStatus
from shared.db.session import DATABASE_DOWN, make_engine, session_factory
from shared.db.store import register_worker
from shared.errors import BrokerUnavailable
from shared.logs import bound, outage
from shared.logs import configure as configure_logging
from shared.spec import load_profile
from shared.storage import open_storage_from_settings

# Imported before the pool forks (torch and diffusers, not CUDA), so a replacement pool process starts in
# a fraction of a second instead of re-importing them.
from workers.lifecycle import Lifecycle
from workers.notify import Notifier
from workers.policy import Limits
from workers.upkeep import Upkeep

log = logging.getLogger("archfarm.worker")
DATABASE, BROKER = outage("database"), outage("broker")
logging.getLogger("celery.app.trace").setLevel(logging.WARNING)  # its per-delivery line; `render` logs the task's

settings = get_settings()
app = make_celery(settings)
if settings.warm:  # the pool process compiles its profiles before it says it is up
    app.conf.worker_proc_alive_timeout = settings.warm_timeout
NODE = os.environ.get("ARCHFARM_WORKER_NODE") or f"archfarm-{settings.device}@{socket.gethostname()}"
WORKER_ID = os.environ.get("ARCHFARM_WORKER_ID") or f"{NODE}#{uuid.uuid4().hex[:8]}"
"""One per process start: liveness is judged per incarnation, blocklists per node. The launcher names it,
so that it can hand back what this process held when it exits."""

_engine = make_engine(settings.database_url)
_sessions = session_factory(_engine)
_lifecycle: Lifecycle | None = None
_queues: list[str] = [settings.queue]
_stop = threading.Event()


def send(task_ids: list[str], delay: float) -> None:
    """Send tasks due now; delayed ones are held in the database (`requeue_task`), and the dispatch of any
    worker's heartbeat sends them once due."""
    if delay > 0:
        return
    try:
        send_tasks(app, messages_for(_sessions, settings, task_ids))
    except BrokerUnavailable as error:
        BROKER.failed(error)
        raise
    BROKER.answered()


@app.task(name=RENDER_TASK)
def render(task_id: str, job_id: str | None = None) -> None:
    """Deliver the task id to the lifecycle and log how the task ended: Celery's own line would say that its
    delivery `succeeded` whatever became of the task (cancelled, failed, handed on)."""
    started = time.perf_counter()
    with bound(job_id=job_id, task_id=task_id):
        status = lifecycle().run(task_id)
    if status is None:
        outcome = "handed on (another delivery or worker settles it)"
    else:
        outcome = "rendered, uploading" if status is TaskStatus.RUNNING else status.value
    with bound(job_id=job_id, task_id=task_id):
        log.info("task %s: %s in %.1f s", task_id, outcome, time.perf_counter() - started)


def lifecycle() -> Lifecycle:
    """The pool process's lifecycle (its renderer, and CUDA, start with the first task)."""
    global _lifecycle
    if _lifecycle is None:
        _lifecycle = Lifecycle(
            settings,
            _sessions,
            worker=WORKER_ID,
            node=NODE,
            send=send,
            limits=Limits.farm(settings),
            # Control maps are cached in the shared storage, so each is computed once for the whole farm.
            farm_storage=open_storage_from_settings(settings),
            # Whoever settles a task notices at once whether its job ended or failed (the upkeep catches the rest).
            on_done=Notifier(settings, _sessions).task_done,
        )
    return _lifecycle


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies, so a pool process never outlives its worker."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        log.warning("cannot set PR_SET_PDEATHSIG; pool processes may outlive a killed worker")


@signals.setup_logging.connect
def _logging(**_: object) -> None:
    """archfarm's format (`ARCHFARM_LOG_FORMAT`) instead of Celery's, in the main and the pool processes."""
    configure_logging(settings.log_format)


@signals.worker_process_init.connect
def _pool_process_started(**_: object) -> None:
    _die_with_parent()
    _engine.dispose(close=False)  # connections inherited through fork belong to the parent
    # Concurrency is 1: anything this worker still holds was being run (or uploaded) by a pool process
    # that died. The policy decides: usually sent again; failed if it keeps killing processes.
    lifecycle().recover_crashed("the worker process running it died")
    # Before the pool process says it is up: warm, then be ready.
    lifecycle().warm([(name, load_profile(name)) for name in settings.warm])


@signals.worker_process_shutdown.connect
def _pool_process_stopping(**_: object) -> None:
    if _lifecycle is not None:
        _lifecycle.close()


@signals.worker_init.connect
def _worker_started(**_: object) -> None:
    with _sessions.begin() as session:
        register_worker(session, WORKER_ID, NODE, settings.device, os.getpid(), _queues)
    threading.Thread(target=_upkeep_loop, name="archfarm-upkeep", daemon=True).start()


@signals.worker_shutdown.connect
def _worker_stopping(**_: object) -> None:
    """Stop the upkeep; what is still held is handed back by the launcher once this process has exited
    (`workers.upkeep.release`), also when a second Ctrl-C cuts the shutdown short."""
    _stop.set()


def _upkeep_loop() -> None:
    upkeep = Upkeep(settings, _sessions, WORKER_ID, send)
    while not _stop.wait(settings.heartbeat_interval):
        try:
            alive = upkeep.beat()
        except DATABASE_DOWN as error:  # one line when an outage starts, one when it ends (`shared.logs.Outage`)
            DATABASE.failed(error)
            continue
        except BrokerUnavailable:  # logged by `send`
            continue
        except Exception:  # a bug, not an outage: it must not kill the upkeep thread
            log.exception("heartbeat failed")
            continue
        DATABASE.answered()
        if not alive:
            log.error("declared dead by another worker's reaper; stopping")
            os.kill(os.getpid(), signal.SIGTERM)


def main(queues: list[str]) -> None:
    _queues[:] = queues
    try:
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
            ]
        )
    finally:
        # Out of the interpreter's last garbage collection: it would walk every object torch and diffusers made
        # (imported here before the pool forks), about 2 s of a stop that has nothing left to free.
        gc.freeze()
