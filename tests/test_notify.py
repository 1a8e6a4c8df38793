"""Job notifications against a real HTTP receiver on loopback, on both databases and on a real farm.

Each event reaches each URL exactly once, signed: when a job ends or first fails, when the receiver fails
the first attempts, when several processes notice the same end at once, when nobody noticed it (the worker
that settled the last task died first), and when a worker is killed as the job ends, mid-delivery.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from producer.expand import expand
from producer.local import render_local
from producer.remote import check_remote
from producer.submit import PreparedJob, persist
from shared.config import Settings
from shared.db.models import Notification, TaskStatus
from shared.db.notifications import noticeable, rearm
from shared.db.session import make_engine, session_factory
from shared.db.store import claim_task, fail_task, finish_task, register_worker, retry_job
from shared.errors import InvalidInput, SubmitWarning
from shared.notify import DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, verify
from shared.plans import Plan
from shared.spec import JobSpec, parse_model
from tests.processes import alive, children_of, wait_for
from tests.test_farm import FAST
from tests.test_farm import job as farm_job
from workers.notify import Notifier
from workers.upkeep import Upkeep

SECRET = "s3cret-for-tests"
PUBLIC = "https://farm.example"
PLAN = Plan(url="file:///plans/ground.png", name="ground", digest="d" * 64)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int | None = None
    """What the receiver answers (None: not yet decided)."""

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def signed(self) -> bool:
        return verify(SECRET, self.body, self.headers.get(SIGNATURE_HEADER))


class Receiver:
    """A webhook receiver on loopback: records every POST and answers from a script per path (then 200).
    With `hold_first`, the first request waits for `release()` before it is answered."""

    def __init__(self, hold_first: bool = False) -> None:
        self.received: list[Received] = []
        self.script: dict[str, list[int]] = {}
        self.changed = threading.Condition()
        self.held = threading.Event()
        self._release = threading.Event()
        self._hold = hold_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # the name http.server calls
                request = Received(self.path, dict(self.headers), self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.changed:
                    receiver.received.append(request)
                    hold, receiver._hold = receiver._hold, False
                    answers = receiver.script.get(self.path) or []
                    status = answers.pop(0) if answers else 200
                    receiver.changed.notify_all()
                if hold:
                    receiver.held.set()
                    receiver._release.wait(60)
                    status = 500
                with receiver.changed:
                    request.status = status
                    receiver.changed.notify_all()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the sender is gone
                    return

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="receiver", daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def release(self) -> None:
        self._release.set()

    def wait(self, condition: Callable[[list[Received]], bool], timeout: float, what: str) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: condition(self.received), timeout):
                raise AssertionError(f"timed out after {timeout} s waiting for {what}: got {self.received}")

    def answered(self, path: str, event: str) -> list[Received]:
        with self.changed:
            return [r for r in self.received if r.path == path and r.headers[EVENT_HEADER] == event and r.status == 200]

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


def settings_for(database_url: str, **changes: Any) -> Settings:
    values = {
        "database_url": database_url,
        "notify_secret": SECRET,
        "public_url": PUBLIC,
        "notify_backoff": 0.05,
        **changes,
    }
    return Settings(**values)


def submit(sessions: sessionmaker[Session], urls: list[str], events: list[str], tasks: int = 3) -> PreparedJob:
    job_id = str(uuid.uuid4())
    spec = JobSpec.model_validate(
        {
            "name": "villa",
            "plans": [PLAN.url],
            "styles": ["modern"],
            "seeds": {"count": tasks},
            "profile": "tiny",
            "notify": {"urls": urls, "events": events},
        }
    )
    job = PreparedJob(
        id=job_id, spec=spec, output_url="file:///out", queue="archfarm", tasks=expand(spec, [PLAN], job_id)
    )
    with sessions.begin() as session:
        persist(session, job)
    return job


def settle(sessions: sessionmaker[Session], task_id: str, status: TaskStatus) -> None:
    """What a worker records when a task ends (without noticing anything)."""
    with sessions.begin() as session:
        assert claim_task(session, task_id, "w#1")
        if status is TaskStatus.SUCCEEDED:
            assert finish_task(session, task_id, "w#1")
        else:
            assert fail_task(session, task_id, "w#1", "ModelError: no such model")


def rows(sessions: sessionmaker[Session], job_id: str) -> dict[tuple[str, str], Notification]:
    with sessions() as session:
        found = session.scalars(select(Notification).where(Notification.job_id == job_id)).all()
    return {(n.event, n.url): n for n in found}


def events_of(received: list[Received]) -> list[tuple[str, str]]:
    return sorted((r.path, r.headers[EVENT_HEADER]) for r in received)


# --- the spec and the settings ---------------------------------------------------------------------------


def test_notify_in_a_job_is_validated() -> None:
    base = {"plans": ["a.png"], "styles": ["modern"], "seeds": [1], "profile": "tiny"}
    spec = parse_model(JobSpec, {**base, "notify": {"urls": ["https://hooks.example/a"]}})
    assert spec.notify is not None and spec.notify.events == ["finished"]
    for notify, message in [
        ({"urls": ["ftp://hooks.example/a"]}, "notify.urls: 'ftp://hooks.example/a': not an http:// or https://"),
        ({"urls": ["https://a/x", "https://a/x"]}, "notify.urls: a URL is named twice"),
        ({"urls": [f"https://a/{i}" for i in range(6)]}, "notify.urls: List should have at most 5 items"),
        ({"urls": []}, "notify.urls: List should have at least 1 item"),
        ({"urls": ["https://a/x"], "events": ["done"]}, "notify.events.0: should be 'finished', 'failed', "),
        ({"urls": ["https://a/x"], "events": ["failed", "failed"]}, "notify.events: an event is named twice"),
        ({"urls": ["https://a/x"], "when": "always"}, "notify.when: unknown field"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            parse_model(JobSpec, {**base, "notify": notify})
        assert message in str(caught.value) and "\n" not in str(caught.value)


def test_settings_take_json_urls_and_treat_empty_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCHFARM_NOTIFY_URLS", '["https://a.example/hook", "http://b.example/x"]')
    monkeypatch.setenv("ARCHFARM_NOTIFY_SECRET", "")
    monkeypatch.setenv("ARCHFARM_PUBLIC_URL", "https://farm.example/")
    settings = Settings()
    assert settings.notify_urls == ["https://a.example/hook", "http://b.example/x"]
    assert settings.notify_secret is None and settings.public_url == "https://farm.example"
    monkeypatch.setenv("ARCHFARM_NOTIFY_URLS", '["file:///etc/passwd"]')
    with pytest.raises(ValidationError, match="not an http:// or https:// URL"):
        Settings()


def test_the_api_takes_notification_urls_only_under_the_allowed_prefixes() -> None:
    """A remote caller must not make the workers POST wherever it likes (the farm's own network)."""
    base = {"plans": ["s3://farm/plans/a.png"], "styles": ["modern"], "seeds": [1], "profile": "tiny"}
    settings = Settings(storage_url="s3://farm/renders", api_notify_prefixes=["https://hooks.example/team/"])
    for url in ["https://hooks.example/team/build", "https://HOOKS.example/team/x?y=1"]:
        check_remote(parse_model(JobSpec, {**base, "notify": {"urls": [url]}}), settings)
    check_remote(parse_model(JobSpec, base), Settings(storage_url="s3://farm/renders"))  # the farm's default applies
    for url in [
        "https://hooks.example/other",
        "https://hooks.example.evil/team/x",
        "http://hooks.example/team/x",
        "https://hooks.example/team/../admin",
        "http://127.0.0.1:6379/team/",
    ]:
        with pytest.raises(InvalidInput, match=r"notify\.urls\.0: .*the API takes notification URLs under"):
            check_remote(parse_model(JobSpec, {**base, "notify": {"urls": [url]}}), settings)
    with pytest.raises(InvalidInput, match="nothing .ARCHFARM_API_NOTIFY_PREFIXES"):
        spec = parse_model(JobSpec, {**base, "notify": {"urls": ["https://hooks.example/team/a"]}})
        check_remote(spec, Settings(storage_url="s3://farm/renders"))


# --- one process, both databases ---------------------------------------------------------------------------


def test_each_event_reaches_each_url_once_signed(sessions: sessionmaker[Session], database_url: str, receiver) -> None:
    urls = [receiver.url("/a"), receiver.url("/b")]
    job = submit(sessions, urls, ["finished", "failed", "first_failure"])
    notifier = Notifier(settings_for(database_url), sessions)
    first, second, third = (t.id for t in job.tasks)

    settle(sessions, first, TaskStatus.SUCCEEDED)
    notifier.task_done(first, TaskStatus.SUCCEEDED)
    settle(sessions, second, TaskStatus.FAILED)
    notifier.task_done(second, TaskStatus.FAILED)  # fires first_failure; its thread sends it
    receiver.wait(lambda got: len([r for r in got if r.status == 200]) == 2, 30, "the first failure at both URLs")
    settle(sessions, third, TaskStatus.SUCCEEDED)
    notifier.task_done(third, TaskStatus.SUCCEEDED)  # the job ends partially succeeded: finished and failed
    receiver.wait(lambda got: len([r for r in got if r.status == 200]) == 6, 30, "every event at both URLs")
    wait_for(lambda: {n.state for n in rows(sessions, job.id).values()} == {"delivered"}, 30, "every row delivered")
    assert notifier.sweep() == 0 and notifier.deliver() == 0  # nothing is left to send, nothing sent twice

    assert events_of(receiver.received) == sorted(
        (path, event) for path in ("/a", "/b") for event in ("finished", "failed", "first_failure")
    )
    assert all(r.signed and r.status == 200 for r in receiver.received)
    assert len({r.headers[DELIVERY_HEADER] for r in receiver.received}) == 6
    assert all(r.payload["delivery"] == r.headers[DELIVERY_HEADER] for r in receiver.received)
    by_event = {r.headers[EVENT_HEADER]: r.payload for r in receiver.received if r.path == "/a"}
    assert by_event["first_failure"]["job"]["status"] == "running"
    assert by_event["first_failure"]["error"] == "ModelError: no such model"
    ended = by_event["finished"]
    assert ended["event"] == "finished"
    assert ended["job"] == {
        "id": job.id,
        "name": "villa",
        "status": "partially_succeeded",
        "counts": {"queued": 0, "running": 0, "succeeded": 2, "failed": 1, "cancelled": 0},
        "total": 3,
        "sheet_url": f"{PUBLIC}/ui/jobs/{job.id}",
    }
    assert by_event["failed"]["job"] == ended["job"] and "error" not in ended
    assert {n.attempts for n in rows(sessions, job.id).values()} == {1}


@pytest.mark.slow
def test_a_receiver_failing_twice_gets_it_on_the_third_attempt(
    sessions: sessionmaker[Session], database_url: str, receiver
) -> None:
    receiver.script["/hook"] = [500, 503]
    job = submit(sessions, [receiver.url("/hook")], ["finished"], tasks=1)
    notifier = Notifier(settings_for(database_url), sessions)
    settle(sessions, job.tasks[0].id, TaskStatus.SUCCEEDED)
    assert notifier.notice(job.id) == 1
    # The upkeep's rounds: each sends what is due (retries after 0.05 s, then 0.3 s).
    wait_for(lambda: notifier.deliver() or len(receiver.received) == 3, 30, "the third attempt")
    assert [r.status for r in receiver.received] == [500, 503, 200]
    assert all(r.signed for r in receiver.received)
    assert len({r.headers[DELIVERY_HEADER] for r in receiver.received}) == 1  # one delivery, tried three times
    assert len({r.body for r in receiver.received}) == 1
    row = rows(sessions, job.id)[("finished", receiver.url("/hook"))]
    assert (row.state, row.attempts, row.last_error) == ("delivered", 3, "HTTP 503")
    assert row.delivered_at is not None
    assert notifier.deliver() == 0 and len(receiver.received) == 3


@pytest.mark.slow
def test_a_notification_is_given_up_after_its_attempts(
    sessions: sessionmaker[Session], database_url: str, receiver
) -> None:
    receiver.script["/down"] = [500] * 10
    job = submit(sessions, [receiver.url("/down")], ["finished"], tasks=1)
    notifier = Notifier(settings_for(database_url, notify_attempts=2), sessions)
    settle(sessions, job.tasks[0].id, TaskStatus.SUCCEEDED)
    notifier.notice(job.id)
    wait_for(lambda: notifier.deliver() or len(receiver.received) == 2, 30, "two attempts")
    row = rows(sessions, job.id)[("finished", receiver.url("/down"))]
    assert (row.state, row.attempts, row.last_error) == ("abandoned", 2, "HTTP 500")
    assert notifier.deliver() == 0 and len(receiver.received) == 2


def test_several_noticers_at_once_send_once(sessions: sessionmaker[Session], database_url: str, receiver) -> None:
    """Workers that all see the job's end at the same moment (their settles, their sweeps): one POST per URL."""
    noticers = 4
    urls = [receiver.url("/a"), receiver.url("/b")]
    job = submit(sessions, urls, ["finished", "failed"], tasks=2)
    for task in job.tasks:
        settle(sessions, task.id, TaskStatus.SUCCEEDED)
    start = threading.Barrier(noticers)
    errors: list[BaseException] = []

    def notice(index: int) -> None:
        engine = make_engine(database_url)  # a process of its own, as far as the database can tell
        notifier = Notifier(settings_for(database_url), session_factory(engine))
        try:
            start.wait(10)
            if index % 2:
                notifier.task_done(job.tasks[-1].id, TaskStatus.SUCCEEDED)
            else:
                notifier.sweep()
            notifier.deliver()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            engine.dispose()

    threads = [threading.Thread(target=notice, args=(i,)) for i in range(noticers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    wait_for(lambda: {n.state for n in rows(sessions, job.id).values()} == {"delivered", "skipped"}, 30, "delivery")
    assert events_of(receiver.received) == [("/a", "finished"), ("/b", "finished")]
    assert all(r.signed and r.status == 200 for r in receiver.received)
    states = {key: n.state for key, n in rows(sessions, job.id).items()}
    assert states == {
        ("finished", urls[0]): "delivered",
        ("finished", urls[1]): "delivered",
        ("failed", urls[0]): "skipped",
        ("failed", urls[1]): "skipped",
    }


def test_an_end_nobody_noticed_is_sent_by_the_upkeep(
    sessions: sessionmaker[Session], database_url: str, receiver
) -> None:
    """The worker that settled the last task died before it could notice: any worker's heartbeat sends it."""
    job = submit(sessions, [receiver.url("/hook")], ["finished", "first_failure"], tasks=2)
    settle(sessions, job.tasks[0].id, TaskStatus.SUCCEEDED)
    settle(sessions, job.tasks[1].id, TaskStatus.SUCCEEDED)
    settings = settings_for(database_url)
    with sessions.begin() as session:
        register_worker(session, "other#1", "other", "cpu", 1, ["archfarm"])
        assert noticeable(session, 10) == [job.id]
    assert Upkeep(settings, sessions, "other#1", lambda ids, delay: None).beat()
    receiver.wait(lambda got: any(r.status == 200 for r in got), 30, "the upkeep's delivery")
    wait_for(lambda: rows(sessions, job.id)[("finished", receiver.url("/hook"))].state == "delivered", 30, "record")
    assert events_of(receiver.received) == [("/hook", "finished")] and receiver.received[0].signed
    assert rows(sessions, job.id)[("first_failure", receiver.url("/hook"))].state == "skipped"
    with sessions() as session:
        assert noticeable(session, 10) == []


def test_a_retry_starts_the_events_afresh(sessions: sessionmaker[Session], database_url: str, receiver) -> None:
    job = submit(sessions, [receiver.url("/hook")], ["finished", "failed"], tasks=1)
    notifier = Notifier(settings_for(database_url), sessions)
    (task_id,) = (t.id for t in job.tasks)
    settle(sessions, task_id, TaskStatus.FAILED)
    notifier.notice(job.id)
    notifier.deliver()
    assert events_of(receiver.received) == [("/hook", "failed"), ("/hook", "finished")]
    with sessions.begin() as session:  # what `archfarm retry` does
        rearm(session, job.id)
        assert retry_job(session, job.id) == [task_id]
    settle(sessions, task_id, TaskStatus.SUCCEEDED)
    notifier.notice(job.id)
    notifier.deliver()
    finished = [r for r in receiver.received if r.headers[EVENT_HEADER] == "finished"]
    assert [r.payload["job"]["status"] for r in finished] == ["failed", "succeeded"]
    assert len({r.headers[DELIVERY_HEADER] for r in finished}) == 2  # a new delivery, not a repeat
    assert len(receiver.received) == 3  # and no second `failed`: this run succeeded
    with sessions.begin() as session:  # a retry with nothing to requeue arms nothing
        rearm(session, job.id)
    assert notifier.notice(job.id) == 0


def test_without_a_secret_the_body_goes_unsigned(sessions: sessionmaker[Session], database_url: str, receiver) -> None:
    job = submit(sessions, [receiver.url("/hook")], ["finished"], tasks=1)
    settle(sessions, job.tasks[0].id, TaskStatus.SUCCEEDED)
    notifier = Notifier(settings_for(database_url, notify_secret=None, public_url=None), sessions)
    notifier.notice(job.id)
    assert notifier.deliver() == 1
    (request,) = receiver.received
    assert SIGNATURE_HEADER not in request.headers and request.payload["job"]["sheet_url"] is None


# --- archfarm render: in this process, at the end of the job --------------------------------------------------


@pytest.mark.slow
def test_render_sends_at_the_end_and_says_what_it_could_not(
    tmp_path: Path, example_plan: Path, models_dir: Path, receiver
) -> None:
    receiver.script["/flaky"] = [500]
    receiver.script["/down"] = [500] * 10
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        models_dir=models_dir,
        device="cpu",
        notify_secret=SECRET,
        notify_backoff=0.2,
        notify_attempts=2,
        notify_urls=[receiver.url("/flaky"), receiver.url("/down")],  # the farm's default: this job names none
    )
    spec = JobSpec.model_validate(
        {
            "plans": [str(example_plan)],
            "styles": ["modern"],
            "seeds": {"count": 2},
            "profile": {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "controls": [{"kind": "canny"}]},
            "output": str(tmp_path / "out"),
        }
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = render_local(spec, settings)
    assert report.ok
    assert [str(w.message) for w in caught if issubclass(w.category, SubmitWarning)] == [
        f"job {report.job_id}: finished notification to http://127.0.0.1:{receiver.server.server_port} not "
        "delivered (HTTP 500); retried by the next render or worker on its database"
    ]
    assert [(r.path, r.status) for r in receiver.received if r.path == "/flaky"] == [("/flaky", 500), ("/flaky", 200)]
    assert all(r.signed and r.payload["job"]["status"] == "succeeded" for r in receiver.received)
    assert len(receiver.answered("/flaky", "finished")) == 1


# --- a real farm: a worker killed as its job ends ----------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.s3
@pytest.mark.slow
def test_a_worker_killed_as_its_job_ends_loses_no_notification(
    farm, farm_env: dict[str, str], start_workers, example_plan: Path
) -> None:
    """The worker that settles the last task starts delivering and is killed (its whole process tree) while
    the receiver holds that POST: a new worker's upkeep sends it once the attempt's lease is over. Each URL
    gets the event, always under one delivery id (a receiver sees the unanswered attempt's id once more)."""
    receiver = Receiver(hold_first=True)
    farm_env.update(
        {
            "ARCHFARM_NOTIFY_SECRET": SECRET,
            "ARCHFARM_NOTIFY_TIMEOUT": "2",  # a claimed attempt is held for 6 s
            "ARCHFARM_NOTIFY_BACKOFF": "0.5",
        }
    )
    urls = [receiver.url("/a"), receiver.url("/b")]
    try:
        first = start_workers("cpu:1")
        job_id = farm.submit(
            {**farm_job(example_plan, FAST, seeds=1), "notify": {"urls": urls, "events": ["finished", "failed"]}}
        )
        assert receiver.held.wait(120), "the job's end was never notified"
        tree = [first.proc.pid]
        for pid in tree:
            tree += children_of(pid)
        for pid in reversed(tree):  # pool processes first, then the worker, then its launcher
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(alive(pid) for pid in tree), 10, "the whole worker to die")
        first.proc.wait(10)
        receiver.release()
        start_workers("cpu:1")
        receiver.wait(
            lambda got: {r.path for r in got if r.status == 200} == {"/a", "/b"}, 60, "both URLs to get the event"
        )
        wait_for(
            lambda: {n.state for n in rows(farm.sessions, job_id).values()} == {"delivered", "skipped"}, 30, "rows"
        )
    finally:
        receiver.close()
    assert farm.status(job_id).status.value == "succeeded"
    for path in ("/a", "/b"):
        # another sender of the killed tree may have had its POST answered before recording it: a repeat,
        # with the same delivery id, is what the README promises then; a loss or a new id is not
        assert len(receiver.answered(path, "finished")) >= 1
        sent = [r for r in receiver.received if r.path == path]
        assert all(r.signed and r.headers[EVENT_HEADER] == "finished" for r in sent)
        assert len({r.headers[DELIVERY_HEADER] for r in sent}) == 1 and len({r.body for r in sent}) == 1
    held = receiver.received[0]
    assert held.status == 500  # answered once its sender was dead: never taken either way
    assert rows(farm.sessions, job_id)[("finished", receiver.url(held.path))].attempts >= 2


def test_a_staged_job_tells_once_it_waits_for_a_pick_and_finishes_only_when_picking_is_done(
    tmp_path: Path, example_plan: Path, models_dir: Path, receiver
) -> None:
    from producer.client import Farm

    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        models_dir=models_dir,
        device="cpu",
        broker_url=None,
        storage_url=str(tmp_path / "out"),
        notify_secret=SECRET,
    )
    job = {
        "plans": [str(example_plan)],
        "styles": ["modern"],
        "seeds": [1, 2],
        "profile": {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "controls": [{"kind": "canny"}]},
        "draft": {"steps": 1},
        "pick": {"by": "hand"},
        "final": {"scale": 1, "strength": 0.5},
        "notify": {"urls": [receiver.url("/hook")], "events": ["pick_needed", "finished"]},
    }
    with Farm(settings) as farm:
        job_id = farm.submit(job)
        assert [r.payload["job"]["status"] for r in receiver.answered("/hook", "pick_needed")] == ["waiting_for_pick"]
        assert receiver.answered("/hook", "finished") == []  # waiting is not an end
        farm.pick(job_id, [farm.results(job_id)[0].id])
        assert len(receiver.answered("/hook", "pick_needed")) == 1 and receiver.answered("/hook", "finished") == []
        farm.pick(job_id, done=True)
    assert [r.payload["job"]["status"] for r in receiver.answered("/hook", "finished")] == ["succeeded"]
