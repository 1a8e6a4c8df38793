"""A worker's housekeeping beside its tasks, once per heartbeat: heartbeat, dispatch, reaper, sweeper,
notifications.

- The heartbeat proves this worker alive (database clock).
- Dispatch (`shared.dispatch`) sends the next tasks of the farm's jobs in turn (owners by fair share, an
  owner's jobs by priority and deadline), keeping each queue's messages to a window sized from its live
  workers; a task retried or handed on after a delay waits here until due (no broker countdowns).
- Deadlines (`shared.deadlines`): a job newly forecast to finish after its deadline is flagged, which
  fires its `deadline_at_risk` notification.
- The reaper declares workers silent for `heartbeat_timeout` dead and hands their tasks back: interrupted,
  not failed (the policy holds nothing against a task or node for it).
- The sweeper re-sends tasks that have no message: queued, due more than `stranded_after` ago, on a queue a
  live worker has watched idle for as long, or passed over by a worker that took a message sorting after
  theirs (`stranded`). A message lost with a killed worker, or with a broker restarted without
  persistence, never sent by an interrupted submit, or not sent because the broker was down when a task was
  requeued: each ends up here, and is sent again, the most urgent first.
- Notifications (`workers.notify`): the job events nobody noticed are fired and whatever is due is sent, on
  a thread of their own, so a slow receiver never delays a heartbeat.
- Picks (`shared.db.stages`): a staged job picked by adherence whose drafts have all ended, but whose rule did
  not run (the worker that ended its last draft died first), is picked and its finals are sent; a job whose
  `pick.timeout` has passed has its picks closed.

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
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from shared.broker import JOB_PRIORITIES, broker_priority, make_celery, messages_for, send_tasks
from shared.config import Settings
from shared.db.clock import database_time
from shared.db.session import DATABASE_DOWN, make_engine, session_factory
from shared.db.stages import advance, ripe
from shared.db.store import (
    Delivery,
    Stranded,
    close_expired_gates,
    deliveries,
    heartbeat,
    idle_queues,
    reap,
    requeue_held,
    stop_worker,
    sweep,
)
from shared.deadlines import flag_at_risk
from shared.dispatch import top_up
from workers.notify import Notifier

log = logging.getLogger(__name__)

SWEEP_CHUNK = 1000
RIPE_CHUNK = 20
"""Jobs whose pick rule one heartbeat runs at most."""


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
        self.flag_deadlines()  # before the notifier's sweep, which fires their notifications
        self.notifier.kick()
        if time.monotonic() - self._healthy_since >= self.settings.heartbeat_timeout:
            self.reap()
            self.sweep()
        self.dispatch()
        self.pick_by_rule()
        self.close_expired_picks()
        return alive

    def flag_deadlines(self) -> list[str]:
        """Flag the jobs newly forecast past their deadline. A forecast that fails (a bug, a stored job this
        version cannot read) is logged: it must not stop the dispatch after it."""
        try:
            with self.sessions.begin() as session:
                return flag_at_risk(session, self.settings.heartbeat_timeout)
        except DATABASE_DOWN:
            raise
        except Exception:
            log.exception("could not forecast the deadlines")
            return []

    def dispatch(self) -> list[str]:
        """Top every queue up to its window (`shared.dispatch`) and send what that took: the next tasks of the
        farm's jobs, in turn."""
        with self.sessions.begin() as session:
            taken = top_up(session, self.settings)
        if taken:
            self.send(taken, 0)
        return taken

    def reap(self) -> list[str]:
        with self.sessions.begin() as session:
            orphans = reap(session, self.settings.heartbeat_timeout)
        if orphans:
            log.warning("re-sending %d task(s) of dead workers", len(orphans))
            self.send(orphans, 0)
        return orphans

    def close_expired_picks(self) -> list[str]:
        """Close the picks of every job whose `pick.timeout` has passed: it ends once its finals are done."""
        with self.sessions.begin() as session:
            closed = close_expired_gates(session)
        for job_id in closed:
            log.info("job %s: picks closed, their time is up", job_id)
        return closed

    def pick_by_rule(self) -> list[str]:
        """Run the pick rule of every job whose drafts have all ended but whose rule has not run (the worker
        that ended its last draft died first); send the finals it adds."""
        finals: list[str] = []
        with self.sessions.begin() as session:
            for job_id in ripe(session, RIPE_CHUNK):
                finals += advance(session, job_id)
        if finals:
            log.warning("picked by rule for a job whose last draft's worker did not: %d final(s)", len(finals))
            self.send(finals, 0)
        return finals

    def sweep(self) -> list[str]:
        """Send again every task found stranded, highest priority first; stops at the first chunk the broker
        refuses."""
        swept: list[str] = []
        after = self.settings.stranded_after
        with self.sessions.begin() as session:  # once: the first chunk sent ends the idling
            where = stranded(idle_queues(session, after), deliveries(session), database_time(session), after)
        while where:
            with self.sessions.begin() as session:
                chunk = sweep(session, where, SWEEP_CHUNK)
            if not chunk:
                break
            log.warning("re-sending %d queued task(s) that had no message", len(chunk))
            self.send(chunk, 0)
            swept += chunk
        return swept


def stranded(idle: set[str], taken: list[Delivery], now: datetime, after_s: float) -> list[Stranded]:
    """Where the tasks without a message are, from two kinds of evidence, each `after_s` old at least:

    - a live worker has consumed a queue without holding a task: any task due there before has no message;
    - a live worker took a message that its queue sorts after a task's (the broker hands out a queue's higher
      priorities first, and each priority's messages in the order they fell due): a message of a lower
      priority, or of the same priority that fell due later, so the task's message is gone. This holds
      while every worker is busy, so lost messages of an urgent job are sent again within `after_s` or so,
      not once a long, less urgent job has drained.

    A false alarm only sends a task twice, which is harmless: a task is claimed once."""
    grace = timedelta(seconds=after_s)
    bounds: dict[tuple[str, int, int], datetime] = {(queue, 0, 100): now - grace for queue in idle}
    for delivery in taken:
        level = broker_priority(delivery.priority)
        for priorities, due_before in (
            ([p for p in JOB_PRIORITIES if broker_priority(p) < level], delivery.taken_at - grace),
            ([p for p in JOB_PRIORITIES if broker_priority(p) == level], delivery.due_at - grace),
        ):
            if priorities:
                key = (delivery.queue, min(priorities), max(priorities))
                bounds[key] = max(due_before, bounds.get(key, due_before))
    return [Stranded(queue, due_before, lowest, highest) for (queue, lowest, highest), due_before in bounds.items()]


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
    except Exception:  # the reaper (database) or the sweeper (broker) takes over
        log.exception("could not hand back the tasks of %s", worker)
        return []
    finally:
        engine.dispose()
