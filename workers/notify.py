"""Sending job notifications (`shared.notify`) from every process that may see a job end.

- Whoever settles a task notices its job's events at once (`Notifier.task_done`, the lifecycle's `on_done`):
  they are fired in the database, and sent by this process's notification thread.
- Every worker's upkeep, on each heartbeat, fires the events nobody noticed (the worker that settled the
  last task was killed first) and sends whatever is due, retries included (`Notifier.kick`).
- `archfarm render` sends its job's events itself at the end, waiting a little for retries
  (`Notifier.settle`); what is still undelivered then is retried by the next render or worker on that database.

A notification is delivered when its URL answers a POST with 2xx; anything else (an error status, a
redirect, a timeout, a refused connection) is tried again after `ARCHFARM_NOTIFY_BACKOFF` seconds, six times
longer each time, until `ARCHFARM_NOTIFY_ATTEMPTS` are used. Each attempt is claimed in the database first,
so two senders never make the same one. A sender that dies during an attempt leaves it to be made again
once the attempt's lease is over: a receiver can, rarely, see one delivery id twice, and should drop the
repeat.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from shared.db.models import TERMINAL, TaskStatus
from shared.db.notifications import armed_job, claim, delivered, due, failed, fire, noticeable, undelivered
from shared.db.session import DATABASE_DOWN
from shared.logs import outage
from shared.notify import headers, where

log = logging.getLogger(__name__)

BACKOFF_FACTOR = 6
BACKOFF_MAX_S = 2 * 3600.0
LEASE_TIMEOUTS = 3
"""A claimed attempt is held for this many timeouts: to connect, to send, to be answered."""
CHUNK = 100

PostFn = Callable[[str, bytes, dict[str, str], float], None]
"""POSTs (url, body, headers, timeout); raises `DeliveryFailed` unless the answer is 2xx."""


class DeliveryFailed(Exception):
    """The receiver did not take the notification; the message is the reason, one line."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer other than 2xx: followed, it would turn the POST into a GET."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def post(url: str, data: bytes, sent_headers: dict[str, str], timeout: float) -> None:
    request = urllib.request.Request(url, data=data, headers=sent_headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        error.close()
        raise DeliveryFailed(f"HTTP {error.code}") from None
    except urllib.error.URLError as error:
        raise DeliveryFailed(str(error.reason) or type(error.reason).__name__) from None
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise DeliveryFailed(str(error) or type(error).__name__) from None
    if not 200 <= status < 300:
        raise DeliveryFailed(f"HTTP {status}")


def backoff(attempt: int, first_s: float) -> float:
    """Seconds after failed attempt `attempt` (1, 2, ...) before the next."""
    return float(min(first_s * BACKOFF_FACTOR ** (attempt - 1), BACKOFF_MAX_S))


class Notifier:
    """One per process that sends; every method may be called from any thread."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], send: PostFn = post) -> None:
        self.settings = settings
        self.sessions = sessions
        self.send = send
        self._secret = None if settings.notify_secret is None else settings.notify_secret.get_secret_value()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = False
        self._state = threading.Condition()  # guards the thread and `_busy`

    def task_done(self, task_id: str, status: TaskStatus) -> None:
        """The lifecycle's `on_done`: a task ended, so its job may have ended or failed. Never raises: what
        cannot be noticed now (the database away) the upkeep's sweep notices later."""
        if status not in TERMINAL:
            return
        try:
            with self.sessions.begin() as session:
                job_id = armed_job(session, task_id)
                fired = 0 if job_id is None else fire(session, job_id, self.settings.public_url)
        except Exception as error:  # noqa: BLE001 - the sweep notices it later
            log.warning("task %s: could not check its job's notifications, left to the sweep: %s", task_id, error)
            return
        if fired:
            self.kick()

    def kick(self) -> None:
        """Sweep and send on this process's notification thread: now, or right after its current round, so a
        slow receiver never holds up a heartbeat or a render."""
        with self._state:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="archfarm-notify", daemon=True)
                self._thread.start()
        self._wake.set()

    def notice(self, job_id: str) -> int:
        """Fire the job's events that happened; returns how many this call fired."""
        with self.sessions.begin() as session:
            return fire(session, job_id, self.settings.public_url)

    def sweep(self) -> int:
        """Fire the events of every job whose events may have happened unnoticed."""
        with self.sessions.begin() as session:
            jobs = noticeable(session, CHUNK)
        return sum(self.notice(job_id) for job_id in jobs)

    def deliver(self) -> int:
        """Make every attempt that is due, here and now; returns how many notifications were delivered."""
        count = 0
        while True:
            with self.sessions.begin() as session:
                rows = due(session, CHUNK)
            outcomes = [self._attempt(row) for row in rows]
            count += sum(outcome is True for outcome in outcomes)
            if all(outcome is None for outcome in outcomes):  # nothing due, or every one claimed elsewhere
                return count

    def settle(self, job_id: str, patience_s: float) -> list[str]:
        """Fire and send the job's events here, waiting up to `patience_s` for retries that fall due; returns
        what is still undelivered then, one line each (left in the database for the next sender)."""
        deadline = time.monotonic() + patience_s
        with self._state:  # an attempt the thread is making now would look like another sender's
            self._state.wait_for(lambda: not self._busy and not self._wake.is_set(), patience_s)
        self.notice(job_id)
        while True:
            self.deliver()
            with self.sessions() as session:
                left = undelivered(session, job_id)
            waits = [wait for _, _, _, wait in left if wait is not None]
            if not waits or time.monotonic() + min(waits) > deadline:
                return [
                    f"{event} notification to {where(url)} not delivered"
                    f"{'' if wait is None else ' yet'} ({error or 'not tried'})"
                    for event, url, error, wait in left
                ]
            time.sleep(min(waits))

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            with self._state:
                self._busy = True
            self._wake.clear()
            try:
                self.sweep()
                self.deliver()
            except DATABASE_DOWN as error:  # the next kick tries again; the outage is logged once
                outage("database").failed(error)
            except Exception as error:  # noqa: BLE001 - a bug: the next kick tries again
                log.warning("notifications: %s; trying again at the next heartbeat", error)
            finally:
                with self._state:
                    self._busy = False
                    self._state.notify_all()

    def _attempt(self, row: tuple[int, int, int]) -> bool | None:
        """One attempt at a due notification: True delivered, False failed, None claimed by another sender."""
        lease = LEASE_TIMEOUTS * self.settings.notify_timeout
        with self.sessions.begin() as session:
            held = claim(session, row, lease)
        if held is None:
            return None
        data = held.body.encode()
        try:
            self.send(
                held.url, data, headers(held.event, held.delivery, data, self._secret), self.settings.notify_timeout
            )
        except DeliveryFailed as error:
            attempts = self.settings.notify_attempts
            retry_in = None if held.attempt >= attempts else backoff(held.attempt, self.settings.notify_backoff)
            with self.sessions.begin() as session:
                failed(session, held, str(error), retry_in)
            then = "given up" if retry_in is None else f"next in {retry_in:g} s"
            log.warning(
                "job %s: %s notification to %s failed (attempt %d of %d, %s): %s",
                held.job_id,
                held.event,
                where(held.url),
                held.attempt,
                attempts,
                then,
                error,
            )
            return False
        with self.sessions.begin() as session:
            delivered(session, held)
        return True
