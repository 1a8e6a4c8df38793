"""A worker's housekeeping beside its tasks, once per heartbeat: heartbeat, reaper, sweeper, notifications.

- The heartbeat proves this worker alive (database clock).
- The reaper declares workers silent for `heartbeat_timeout` dead and hands their tasks back: interrupted,
  not failed (the policy holds nothing against a task or node for it).
- The sweeper re-sends tasks that have no message: queued, due more than `stranded_after` ago, on a queue a
  live worker has watched idle for as long. A message held by a killed worker (a countdown), lost with a
  broker restarted without persistence, never sent by an interrupted submit, or not sent because the broker
  was down when a task was requeued: each ends up here, and is sent again.
- Notifications (`workers.notify`): the job events nobody noticed are fired and whatever is due is sent, on
  a thread of their own, so a slow receiver never delays a heartbeat.

Any live worker may do both. A worker starts reaping and sweeping only once its own heartbeats have gone
through for a whole timeout: after a database outage every heartbeat is stale, and the first worker back
must not declare all the others dead. Concurrent reapers and sweepers never send a task twice: each claims
its rows with a conditional UPDATE. Notifications need no such wait: firing an event and claiming an attempt
are conditional UPDATEs as well.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from shared.broker import make_celery, messages_for, send_tasks
from shared.config import Settings
from shared.db.session import make_engine, session_factory
from shared.db.store import heartbeat, idle_queues, reap, requeue_held, stop_worker, sweep
from workers.notify import Notifier

log = logging.getLogger(__name__)

SWEEP_CHUNK = 1000


class Upkeep:
    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], worker: str, send: Callable[[list[str], float], None]
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.worker = worker
        self.send = send
        self.notifier = Notifier(settings, sessions)
        self._healthy_since: float | None = None

    def beat(self) -> bool:
        """One round; False when another worker's reaper declared this one dead (it must stop). Raises when
        the database or broker is away; the next round tries again."""
        try:
            with self.sessions.begin() as session:
                alive = heartbeat(session, self.worker)
        except Exception:
            self._healthy_since = None
            raise
        self._healthy_since = self._healthy_since or time.monotonic()
        self.notifier.kick()
        if time.monotonic() - self._healthy_since >= self.settings.heartbeat_timeout:
            self.reap()
            self.sweep()
        return alive

    def reap(self) -> list[str]:
        with self.sessions.begin() as session:
            orphans = reap(session, self.settings.heartbeat_timeout)
        if orphans:
            log.warning("re-sending %d task(s) of dead workers", len(orphans))
            self.send(orphans, 0)
        return orphans

    def sweep(self) -> list[str]:
        """Send again every task found stranded; stops at the first chunk the broker refuses."""
        swept: list[str] = []
        with self.sessions.begin() as session:
            queues = idle_queues(session, self.settings.stranded_after)  # once: the first chunk ends the idling
        while queues:
            with self.sessions.begin() as session:
                chunk = sweep(session, queues, self.settings.stranded_after, SWEEP_CHUNK)
            if not chunk:
                break
            log.warning("re-sending %d queued task(s) that had no message", len(chunk))
            self.send(chunk, 0)
            swept += chunk
        return swept


def release(settings: Settings, worker: str) -> list[str]:
    """A worker process that has exited: marked stopped, and what it still held back on the queue now
    (interrupted: nothing counted). Without a database or broker at that moment, the reaper or the sweeper
    does it later; returns the ids sent."""
    engine = make_engine(settings.database_url)
    sessions = session_factory(engine)
    try:
        with sessions.begin() as session:
            held = requeue_held(session, worker)
            stop_worker(session, worker)
        if held:
            log.warning("handing back %d task(s) held by %s", len(held), worker)
            send_tasks(make_celery(settings), messages_for(sessions, settings, held))
        return held
    except Exception:  # noqa: BLE001 - the reaper (database) or the sweeper (broker) takes over
        log.exception("could not hand back the tasks of %s", worker)
        return []
    finally:
        engine.dispose()
