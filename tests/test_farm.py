"""The distributed farm with real parts: Redis, PostgreSQL, SeaweedFS S3 and `archfarm worker` processes.

Workers are real launcher processes with CPU devices; kills are real signals. Each test gets its own queue,
database contents and bucket, so nothing leaks between tests.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import func, select

from producer.client import Farm
from shared.db.models import Artifact, Task, TaskFailure, TaskStatus, Worker
from shared.db.status import JobStatus
from tests.conftest import queued_messages
from tests.processes import WorkerProcess, alive, children_of, live_workers, wait_for, wait_for_value

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.s3, pytest.mark.slow]

FAST = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 4, "controls": [{"kind": "canny"}]}
SLOW = {"base": "tiny-sd15", "width": 256, "height": 256, "steps": 25, "controls": [{"kind": "canny"}]}


def job(plan: Path, profile: dict, seeds: int, styles: list[str] | None = None) -> dict:
    return {
        "name": "farm-test",
        "plans": [str(plan)],
        "styles": styles or ["modern", "japandi"],
        "seeds": {"count": seeds},
        "profile": profile,
    }


def running_task(farm: Farm, job_id: str) -> tuple[str, str] | None:
    with farm.sessions() as session:
        row = session.execute(
            select(Task.id, Task.worker).where(Task.job_id == job_id, Task.status == TaskStatus.RUNNING).limit(1)
        ).first()
    return None if row is None else (row[0], row[1])


def pid_of(farm: Farm, worker_id: str) -> int:
    with farm.sessions() as session:
        return int(session.scalar(select(Worker.pid).where(Worker.id == worker_id)))


def assert_exactly_one_artifact_per_image(farm: Farm, job_id: str, images: int, s3_server, bucket: str) -> None:
    with farm.sessions() as session:
        rows = session.execute(select(Artifact.style, Artifact.seed).where(Artifact.job_id == job_id)).all()
    assert len(rows) == len(set(rows)) == images
    keys = [
        o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"renders/{job_id}/")["Contents"]
    ]
    assert len([k for k in keys if k.endswith(".png")]) == images
    assert len([k for k in keys if k.endswith(".json")]) == images


def assert_rerender_is_bitwise(
    url: str, sidecar: dict, s3_server, bucket: str, env: dict[str, str], tmp_path: Path
) -> None:
    """`archfarm rerender` on this machine's default threads gives the farm worker's image bit for bit, under
    under its original key, and nothing else."""
    original = s3_server.client().get_object(Bucket=bucket, Key=url.split(f"{bucket}/", 1)[1])["Body"].read()
    (tmp_path / "sidecar.json").write_text(json.dumps(sidecar))
    result = subprocess.run(
        [sys.executable, "-m", "producer.cli", "rerender", str(tmp_path / "sidecar.json"), "--out", "again"],
        env={**os.environ, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    written = sorted(p.relative_to(tmp_path / "again").as_posix() for p in (tmp_path / "again").rglob("*.*"))
    assert written == [sidecar["key"].removesuffix(".png") + ".json", sidecar["key"]]
    again = Image.open(tmp_path / "again" / sidecar["key"])
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(io.BytesIO(original))))


def test_submit_render_upload_status(
    farm: Farm,
    start_workers,
    example_plan: Path,
    s3_server,
    s3_bucket: str,
    farm_env: dict[str, str],
    tmp_path: Path,
) -> None:
    start_workers("cpu:2", expect=2)
    job_id = farm.submit(job(example_plan, FAST, seeds=3))
    view = farm.wait(job_id, timeout=120)
    assert view.status is JobStatus.SUCCEEDED and view.counts["succeeded"] == 6
    assert_exactly_one_artifact_per_image(farm, job_id, 6, s3_server, s3_bucket)
    sidecar = json.loads(
        s3_server.client()
        .get_object(Bucket=s3_bucket, Key=farm.results(job_id)[0].sidecar_url.split(f"{s3_bucket}/", 1)[1])["Body"]
        .read()
    )
    assert sidecar["job"]["id"] == job_id and sidecar["models"]["base"]["name"] == "tiny-sd15"
    assert sidecar["plan"]["name"] == example_plan.stem and sidecar["threads"] == 1  # two workers on two cores
    assert_rerender_is_bitwise(farm.results(job_id)[0].url, sidecar, s3_server, s3_bucket, farm_env, tmp_path)
    with farm.sessions() as session:
        workers = session.scalars(select(Worker).where(Worker.stopped_at.is_(None))).all()
    assert sum(w.images_done for w in workers) == 6
    assert all(w.model_loads <= 2 for w in workers)  # base + ControlNet, once per process
    # The CLI's --json view of the same job, from another process.
    result = subprocess.run(
        [sys.executable, "-m", "producer.cli", "status", job_id, "--json"],
        env={**os.environ, **farm_env},
        capture_output=True,
        text=True,
        check=True,
    )
    shown = json.loads(result.stdout)
    assert shown["status"] == "succeeded" and shown["counts"]["succeeded"] == 6


def test_cancel_stops_queued_and_running_tasks(farm: Farm, start_workers, example_plan: Path) -> None:
    start_workers("cpu:1")
    job_id = farm.submit(job(example_plan, SLOW, seeds=4))
    wait_for(lambda: running_task(farm, job_id), 60, "a task to start")
    farm.cancel(job_id)
    view = farm.wait(job_id, timeout=60)
    assert view.status is JobStatus.CANCELLED
    assert view.counts["running"] == view.counts["queued"] == 0
    assert view.counts["cancelled"] >= 7  # the running one stops at its next step unless it had just finished
    # Nothing starts after a cancel: a job sent after it runs behind the cancelled messages, which start nothing.
    after = farm.submit(job(example_plan, FAST, seeds=1))
    assert farm.wait(after, timeout=120).status is JobStatus.SUCCEEDED
    assert farm.status(job_id).counts == view.counts


def test_a_vanished_plan_fails_only_its_own_tasks_and_retry_finishes_the_job(
    farm: Farm, start_workers, example_plan: Path, s3_server, s3_bucket: str, tmp_path: Path
) -> None:
    """4 plans × 3 styles × 4 seeds on two workers, one plan's stored copy deleted before they start (a bucket
    lifecycle rule, a clean-up script): its 12 tasks fail once, with one reason that names it; the other 36
    render; no node is blocklisted; once the plan is back, `retry` finishes the job."""
    plans = []
    for i in range(4):
        drawn = Image.open(example_plan).convert("RGB")
        drawn.paste((0, 0, 0), (8 + 12 * i, 8, 20 + 12 * i, 20))
        drawn.save(path := tmp_path / f"plan-{i}.png")
        plans.append(path)
    spec = {
        **job(example_plan, FAST, seeds=4, styles=["modern", "japandi", "industrial"]),
        "plans": list(map(str, plans)),
    }
    job_id = farm.submit(spec)
    with farm.sessions() as session:
        stored = session.scalar(select(Task.plan_url).where(Task.job_id == job_id, Task.plan_name == "plan-2"))
    s3 = s3_server.client()
    key = stored.removeprefix(f"s3://{s3_bucket}/")
    s3.delete_object(Bucket=s3_bucket, Key=key)
    start_workers("cpu:2", expect=2)
    view = farm.wait(job_id, timeout=300)
    assert view.status is JobStatus.PARTIALLY_SUCCEEDED
    assert (view.counts["succeeded"], view.counts["failed"]) == (36, 12)
    assert {f.plan for f in view.failures} == {"plan-2"}
    assert {f.error for f in view.failures} == {
        f"plan 'plan-2' ({stored}): missing from storage (deleted after the job was submitted?)"
    }
    with farm.sessions() as session:
        assert session.scalar(select(func.count()).select_from(TaskFailure)) == 0  # nothing held against a node
    assert view.workers == 2  # both still serve the job
    s3.put_object(Bucket=s3_bucket, Key=key, Body=plans[2].read_bytes())
    assert farm.retry(job_id) == 12
    view = farm.wait(job_id, timeout=300)
    assert view.status is JobStatus.SUCCEEDED and view.counts["succeeded"] == 48


def test_sigkill_of_the_pool_process_mid_task(
    farm: Farm, start_workers, example_plan: Path, s3_server, s3_bucket: str
) -> None:
    start_workers("cpu:2", expect=2)
    job_id = farm.submit(job(example_plan, SLOW, seeds=2))
    task = wait_for_value(lambda: running_task(farm, job_id), 60, "a task to start")
    main_pid = pid_of(farm, task[1])
    (child,) = children_of(main_pid)
    os.kill(child, signal.SIGKILL)
    view = farm.wait(job_id, timeout=120)
    assert view.status is JobStatus.SUCCEEDED and view.counts["succeeded"] == 4
    assert_exactly_one_artifact_per_image(farm, job_id, 4, s3_server, s3_bucket)
    with farm.sessions() as session:
        assert session.scalar(select(Task.attempts).where(Task.id == task[0])) >= 2


def test_sigkill_of_a_whole_worker_mid_task(
    farm: Farm, start_workers, example_plan: Path, s3_server, s3_bucket: str
) -> None:
    start_workers("cpu:1")
    start_workers("cpu:1")
    job_id = farm.submit(job(example_plan, SLOW, seeds=2))
    task = wait_for_value(lambda: running_task(farm, job_id), 60, "a task to start")
    main_pid = pid_of(farm, task[1])
    (child,) = children_of(main_pid)
    os.kill(main_pid, signal.SIGKILL)
    wait_for(lambda: not alive(child), 10, "the orphaned pool process to die with its worker")
    # Recovered by the reaper (heartbeat timeout 4 s here): Redis's visibility timeout is hours, so the job
    # ending at all within the wait says the reaper handed the task back.
    view = farm.wait(job_id, timeout=300)
    assert view.status is JobStatus.SUCCEEDED and view.counts["succeeded"] == 4
    assert_exactly_one_artifact_per_image(farm, job_id, 4, s3_server, s3_bucket)
    with farm.sessions() as session:
        dead = session.scalar(select(Worker).where(Worker.id == task[1]))
        assert dead is not None and dead.stopped_at is not None
        assert session.scalar(select(Task.worker).where(Task.id == task[0])) != task[1]  # rendered by the other


def test_bad_job_is_refused_at_submit_with_nothing_stored(
    farm: Farm, farm_env: dict[str, str], example_plan: Path, tmp_path: Path
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job(example_plan, FAST, seeds=2, styles=["modern", "rococo"])))
    result = subprocess.run(
        [sys.executable, "-m", "producer.cli", "submit", str(path), "--json"],
        env={**os.environ, **farm_env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and result.stderr == ""
    assert json.loads(result.stdout) == {
        "error": f"{path}: styles: unknown style 'rococo': no stored pack of that name (`archfarm styles`) and no "
        "built-in one (brutalist, industrial, japandi, mediterranean, minimalist, modern, scandinavian)"
    }
    with farm.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Task)) == 0
    assert queued_messages(farm_env["ARCHFARM_BROKER_URL"], farm_env["ARCHFARM_QUEUE"]) == 0


def test_sigterm_finishes_the_current_task_and_loses_nothing(farm: Farm, start_workers, example_plan: Path) -> None:
    worker = start_workers("cpu:1")
    job_id = farm.submit(job(example_plan, SLOW, seeds=2))
    task_id, _ = wait_for_value(lambda: running_task(farm, job_id), 60, "a task to start")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(120) == 0
    with farm.sessions() as session:
        statuses = dict(session.execute(select(Task.id, Task.status).where(Task.job_id == job_id)).all())
    assert statuses.pop(task_id) is TaskStatus.SUCCEEDED  # finished, not abandoned
    assert set(statuses.values()) <= {TaskStatus.QUEUED, TaskStatus.SUCCEEDED}
    assert live_workers(farm) == 0
    start_workers("cpu:1")  # the rest is still in the queue
    assert farm.wait(job_id, timeout=120).status is JobStatus.SUCCEEDED


def test_second_sigint_stops_at_once_and_the_task_runs_elsewhere(farm: Farm, start_workers, example_plan: Path) -> None:
    slow = {**SLOW, "steps": 60}
    worker = start_workers("cpu:1")
    job_id = farm.submit(job(example_plan, slow, seeds=1, styles=["modern"]))
    task_id, _ = wait_for_value(lambda: running_task(farm, job_id), 60, "the task to start")
    worker.proc.send_signal(signal.SIGINT)
    wait_for(
        lambda: b"Hitting Ctrl+C again" in worker.log.read_bytes(), 60, "the first SIGINT to start a warm shutdown"
    )
    worker.proc.send_signal(signal.SIGINT)
    worker.proc.wait(120)
    with farm.sessions() as session:  # handed back unfinished: it did not wait for the render (60 steps at 256²)
        assert session.scalar(select(Task.status).where(Task.id == task_id)) is TaskStatus.QUEUED
    start_workers("cpu:1")
    assert farm.wait(job_id, timeout=180).status is JobStatus.SUCCEEDED


def test_a_call_batching_four_tasks_killed_mid_render_loses_nothing(
    farm: Farm, start_workers, example_plan: Path, s3_server, s3_bucket: str
) -> None:
    """`batch: 4`: a worker takes four tasks into one call; its pool process is killed while they render;
    every one of them is rendered again, once, and the job ends by itself."""
    batched = {**SLOW, "width": 128, "height": 128, "steps": 20, "batch": 4}
    start_workers("cpu:1")
    job_id = farm.submit(job(example_plan, batched, seeds=4))

    def four_running() -> str | None:
        with farm.sessions() as session:
            holders = session.scalars(
                select(Task.worker).where(Task.job_id == job_id, Task.status == TaskStatus.RUNNING)
            ).all()
        return holders[0] if len(holders) == 4 and len(set(holders)) == 1 else None

    holder = wait_for_value(four_running, 60, "a call of four tasks")
    (child,) = children_of(pid_of(farm, holder))
    os.kill(child, signal.SIGKILL)
    view = farm.wait(job_id, timeout=180)
    assert view.status is JobStatus.SUCCEEDED and view.counts["succeeded"] == 8
    assert_exactly_one_artifact_per_image(farm, job_id, 8, s3_server, s3_bucket)
    sidecar = json.loads(
        s3_server.client()
        .get_object(Bucket=s3_bucket, Key=farm.results(job_id)[0].sidecar_url.split(f"{s3_bucket}/", 1)[1])["Body"]
        .read()
    )
    assert sidecar["call"]["tasks"] > 1


def test_celery_tools_see_the_running_task_with_its_job(
    farm: Farm, start_workers, example_plan: Path, farm_env: dict[str, str]
) -> None:
    """`celery -A shared.celery_app inspect active` (what Flower builds on) lists the running task and its job;
    the module it loads pulls in neither torch nor a database driver."""
    env = {**os.environ, **farm_env}
    light = "import sys, shared.celery_app; print(sorted({'torch', 'psycopg', 'diffusers'} & set(sys.modules)))"
    imported = subprocess.run([sys.executable, "-c", light], env=env, capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == "[]", imported.stderr
    start_workers("cpu:1")
    job_id = farm.submit(job(example_plan, SLOW, seeds=1))
    task_id, _ = wait_for_value(lambda: running_task(farm, job_id), 60, "a task to start")
    inspect = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "shared.celery_app", "inspect", "active", "--json", "--timeout", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert inspect.returncode == 0, inspect.stderr
    active = [task for tasks in json.loads(inspect.stdout).values() for task in tasks]
    assert any(task["args"] == [task_id] and task["kwargs"] == {"job_id": job_id} for task in active), active
    farm.cancel(job_id)


def test_json_logs_carry_the_job_and_task_of_each_line(
    farm: Farm, farm_env: dict[str, str], example_plan: Path, tmp_path: Path
) -> None:
    log = tmp_path / "json-worker.log"
    worker = WorkerProcess({**farm_env, "ARCHFARM_LOG_FORMAT": "json"}, "cpu:1", log)
    try:
        wait_for(lambda: live_workers(farm) >= 1, 60, "the worker to start")
        job_id = farm.submit(job(example_plan, FAST, seeds=1))
        assert farm.wait(job_id, timeout=120).status is JobStatus.SUCCEEDED
    finally:
        worker.stop()
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    done = [e for e in entries if e["logger"] == "archfarm.worker" and e["message"].startswith("task ")]
    assert len(done) == 2 and all(
        e["job_id"] == job_id and e["message"].startswith(f"task {e['task_id']}:") for e in done
    )
    assert {"time", "level", "logger"} <= set(done[0])


def test_a_worker_started_with_warm_compiles_every_bucket_before_its_first_task(
    farm: Farm, start_workers, example_plan: Path, tmp_path: Path
) -> None:
    """`archfarm worker --warm PROFILE`: the pool process compiles the profile's buckets (here one: a CPU
    renders a task per call) before it takes a task, says so in `archfarm workers`, and its first task of that
    profile compiles nothing."""
    import yaml

    compiled = {**FAST, "compile": True, "compile_backend": "aot_eager", "compile_mode": "default"}
    profile = tmp_path / "compiled.yaml"
    profile.write_text(yaml.safe_dump(compiled))
    worker = start_workers("cpu:1", 1, "--warm", str(profile))
    (view,) = wait_for_value(
        lambda: [w for w in farm.workers() if w.state == "live" and w.ready_s is not None] or None, 300, "warming"
    )
    assert [(w["profile"], w["buckets"]) for w in view.warmed] == [(str(profile), [1])]
    job_id = farm.submit(job(example_plan, compiled, seeds=2, styles=["modern"]))
    assert farm.wait(job_id, timeout=120).status is JobStatus.SUCCEEDED
    log = worker.log.read_text()
    ready = log.index(f"warmed {profile}")
    assert "first compiled call of tiny-sd15 at 64×64, batch 1 in this process" in log[:ready]
    assert "first compiled call" not in log[ready:]  # the job's tasks replayed what warming compiled
    result = subprocess.run(
        [sys.executable, "-m", "producer.cli", "workers"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "ready after" in result.stdout and f"(warmed {profile} [1])" in result.stdout
