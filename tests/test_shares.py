"""Fair share between owners, quotas and deadlines: who the window's next messages go to, and which jobs the
farm expects to miss their deadline (on SQLite and PostgreSQL, no workers: the database decides)."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from producer.expand import expand
from producer.submit import PreparedJob, persist, prepare
from shared.config import Settings
from shared.db.clock import db_now
from shared.db.costs import backlog, record_cost
from shared.db.models import Job, Notification, Task
from shared.db.notifications import fire, noticeable
from shared.db.shares import Waiting, allocate, check_quota, over_quota_owners, spent_today
from shared.db.store import cancel_job, claim_task, finish_task, pause_job, register_worker, resume_job
from shared.deadlines import flag_at_risk, forecast
from shared.dispatch import MIN_WINDOW, top_up
from shared.errors import InvalidInput, QuotaSpent
from shared.plans import Plan
from shared.spec import JobSpec

PLAN = Plan(url="file:///plans/ground.png", name="ground", digest="d" * 64)
FARM = Settings(heartbeat_timeout=60)


def prepared(seeds: int, owner: str | None, **spec: object) -> PreparedJob:
    job = JobSpec.model_validate(
        {"name": "villa", "plans": [PLAN.url], "styles": ["modern"], "seeds": {"count": seeds}, "profile": "tiny"}
        | spec
    )
    job_id = str(uuid.uuid4())
    return PreparedJob(
        id=job_id, spec=job, output_url="file:///out", queue="archfarm", tasks=expand(job, [PLAN], job_id), owner=owner
    )


def stored(sessions: sessionmaker[Session], *jobs: PreparedJob) -> None:
    with sessions.begin() as session:
        for job in jobs:
            persist(session, job)


def owners_of(sessions: sessionmaker[Session], task_ids: list[str]) -> list[str | None]:
    with sessions() as session:
        owner = {
            task_id: owner
            for task_id, owner in session.execute(select(Task.id, Job.owner).join(Job).where(Task.id.in_(task_ids)))
        }
    return [owner[task_id] for task_id in task_ids]


def run(sessions: sessionmaker[Session], task_ids: list[str]) -> None:
    with sessions.begin() as session:
        for task_id in task_ids:
            assert claim_task(session, task_id, "w#1") and finish_task(session, task_id, "w#1")


def test_each_place_goes_to_the_owner_furthest_below_its_share() -> None:
    a = [Waiting("a1", "alice", 3, 1.0), Waiting("a2", "alice", 1000, 1.0)]
    # One owner: its jobs in turn order, each as far as its tasks go.
    assert allocate(6, a, {}, {"alice": 1}) == ["a1"] * 3 + ["a2"] * 3
    # A newcomer is served alone until it has caught up, then the two alternate.
    bob = [Waiting("b1", "bob", 50, 1.0)]
    assert allocate(8, [*a, *bob], {"alice": 5.0}, {"alice": 1, "bob": 1}) == ["b1"] * 5 + ["a1", "b1", "a1"]
    # Weights: twice the share, twice the GPU-seconds; a task twice as dear counts twice.
    picks = Counter(allocate(300, [*a, Waiting("b1", "bob", 500, 1.0)], {}, {"alice": 2, "bob": 1}))
    assert picks["a1"] + picks["a2"] == 200 and picks["b1"] == 100
    dear = [Waiting("b1", "bob", 500, 3.0)]
    picks = Counter(allocate(400, [*a, *dear], {}, {"alice": 1, "bob": 1}))
    assert picks["a1"] + picks["a2"] == 300 and picks["b1"] == 100


def test_a_later_small_job_of_another_owner_is_sent_before_the_big_one_goes_on(
    sessions: sessionmaker[Session],
) -> None:
    """The window's free places go to the owner with the least work done and in flight, whatever the size of
    each owner's jobs; within an owner, priority and then the earliest deadline decide."""
    big = prepared(200, "alice")
    with sessions.begin() as session:
        persist(session, big)
        register_worker(session, "w#1", "w", "cpu", 1, ["archfarm"])
        first = top_up(session, FARM)
    assert first == [task.id for task in big.tasks[:MIN_WINDOW]]  # one owner: its job in expansion order
    run(sessions, first[:16])  # 16 done, 48 in flight
    soon = datetime.now(UTC) + timedelta(hours=2)
    small = prepared(10, "bob")
    later = prepared(10, "alice", deadline=(soon + timedelta(hours=1)).isoformat())
    earlier = prepared(10, "alice", deadline=soon.isoformat())
    stored(sessions, small, later, earlier)
    with sessions.begin() as session:
        taken = top_up(session, FARM)
    # Bob's 10 go first (alice's 64 tasks are ahead of him), then alice's next: her earliest deadline first.
    assert taken == [t.id for t in small.tasks] + [t.id for t in earlier.tasks[:6]]
    run(sessions, first[16:])
    with sessions.begin() as session:
        taken = top_up(session, FARM)
    assert owners_of(sessions, taken) == ["alice"] * 48 and taken[:4] == [t.id for t in earlier.tasks[6:]]
    assert taken[4:14] == [t.id for t in later.tasks] and taken[14:] == [t.id for t in big.tasks[64:98]]


def test_an_owner_past_its_quota_waits_and_is_refused_new_jobs(sessions: sessionmaker[Session]) -> None:
    """Only work that ran counts (a cancelled job costs nothing); past its quota an owner's tasks wait, and
    the backlog an autoscaler reads leaves them out, as it leaves out a paused job's."""
    quota = Settings(heartbeat_timeout=60, quotas={"bob": 30.0})
    bob, alice, dropped = prepared(40, "bob"), prepared(40, "alice"), prepared(20, "bob")
    stored(sessions, bob, alice, dropped)
    with sessions.begin() as session:
        cancel_job(session, dropped.id)  # its 20 tasks end without running
        assert spent_today(session, "bob") == 0
    with sessions.begin() as session:
        record_cost(session, bob.spec.profile.digest(), "cpu", 2.0)  # 2 GPU-s a task
        check_quota(session, quota, "bob")
        register_worker(session, "w#1", "w", "cpu", 1, ["archfarm"])
        first = top_up(session, quota)
    assert Counter(owners_of(sessions, first)) == {"bob": 32, "alice": 32}
    bobs = [task_id for task_id, owner in zip(first, owners_of(sessions, first), strict=True) if owner == "bob"]
    run(sessions, bobs[:15])
    with sessions.begin() as session:
        assert spent_today(session, "bob") == pytest.approx(30.0)
        with pytest.raises(QuotaSpent, match="'bob' has used 30 of its 30 GPU-seconds"):
            check_quota(session, quota, "bob")
        check_quota(session, quota, "alice")  # no quota
        taken = top_up(session, quota)
    assert set(owners_of(sessions, taken)) == {"alice"} and len(taken) == 8  # bob's room went to alice
    with sessions.begin() as session:
        everything = backlog(session)["archfarm"]
        assert everything == pytest.approx(2.0 * (40 - 15 + 40))  # a prior's worth of nothing: one cost, 2 s
        assert backlog(session, over_quota_owners(session, quota))["archfarm"] == pytest.approx(2.0 * 40)
        pause_job(session, alice.id)
        assert backlog(session, over_quota_owners(session, quota))["archfarm"] == 0
        resume_job(session, alice.id)
    with sessions.begin() as session:  # a day on, bob's work has aged out of his quota
        session.execute(update(Task).where(Task.finished_at.is_not(None)).values(finished_at=db_now(-25 * 3600)))
        check_quota(session, quota, "bob")
        assert set(owners_of(sessions, top_up(session, quota))) == {"bob"}  # alice has nothing left to send


def test_a_job_expected_to_finish_after_its_deadline_is_flagged_and_notified_once(
    sessions: sessionmaker[Session],
) -> None:
    """Each job ends after the work of those ahead of it in its pool, over the pool's live workers; a job
    forecast past its deadline is flagged once and fires `deadline_at_risk` with both times."""
    now = datetime.now(UTC)
    notify = {"urls": ["https://hooks.example/farm"], "events": ["deadline_at_risk", "finished"]}
    ahead = prepared(100, None, priority=60)
    paris = timezone(timedelta(hours=1))  # a zone other than the database's: stored, it must mean the same time
    tight = prepared(10, None, deadline=(now + timedelta(seconds=600)).astimezone(paris).isoformat(), notify=notify)
    loose = prepared(10, None, deadline=(now + timedelta(hours=5)).isoformat(), notify=notify)
    stored(sessions, ahead, tight, loose)
    with sessions.begin() as session:
        record_cost(session, ahead.spec.profile.digest(), "cpu", 10.0)  # every job here has the same profile
        assert flag_at_risk(session, 60) == [] and forecast(session, 60) == {}  # no live worker: no forecast
        register_worker(session, "w#1", "w", "cpu", 1, ["archfarm"])
        register_worker(session, "w#2", "w", "cpu", 2, ["archfarm"])
        found = forecast(session, 60)
    # 1,000 GPU-s ahead, then 100 of its own, on two workers: 550 s; the loose one ends 50 s later.
    assert (found[tight.id].expected_at - now).total_seconds() == pytest.approx(550, abs=5)
    assert (found[loose.id].expected_at - found[tight.id].expected_at).total_seconds() == pytest.approx(50)
    assert not found[tight.id].at_risk and found[ahead.id].deadline_at is None
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id != tight.id).values(priority=70))  # urgent work lands ahead
        record_cost(session, ahead.spec.profile.digest(), "cpu", 20.0)  # and the average rises to 12 s: 720 s
        assert flag_at_risk(session, 60) == [tight.id]
        assert flag_at_risk(session, 60) == []  # once
        assert tight.id in noticeable(session, 10) and fire(session, tight.id, None) == 1
        body = json.loads(
            session.scalar(
                select(Notification.body).where(
                    Notification.job_id == tight.id, Notification.event == "deadline_at_risk"
                )
            )
            or "{}"
        )
    assert body["event"] == "deadline_at_risk" and body["job"]["id"] == tight.id
    assert datetime.fromisoformat(body["deadline"]["expected"]) > datetime.fromisoformat(body["deadline"]["at"])
    with sessions.begin() as session:
        pause_job(session, loose.id)
        assert loose.id not in forecast(session, 60)  # paused: served by nobody, so no forecast, no flag


def test_a_deadline_needs_a_zone_and_a_future() -> None:
    base = {"plans": [PLAN.url], "styles": ["modern"], "seeds": [1], "profile": "tiny"}
    with pytest.raises(InvalidInput, match="deadline.*timezone"):
        JobSpec.from_document(base | {"deadline": "2030-01-01T07:00:00"})
    past = JobSpec.from_document(base | {"deadline": "2020-01-01T07:00:00+01:00"})
    with pytest.raises(InvalidInput, match="deadline: 2020-01-01T07:00:00\\+01:00 has already passed"):
        prepare(past, Settings())  # refused before its plan (which does not exist) is read
