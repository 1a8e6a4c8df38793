"""The farm commands at their edges: a broker that is down at submit, a schema the code does not know,
a device the machine lacks, two launchers on one host, cancelling a finished job.

Real PostgreSQL and Redis; the broker that is "down" is a port nothing listens on.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from shared.db.models import Job, Task, TaskStatus
from shared.db.session import make_engine, upgrade
from tests.conftest import POSTGRES_ADMIN_URL
from workers.launcher import claim_node

FAST = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "controls": [{"kind": "canny"}]}


def archfarm(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def job_file(tmp_path: Path, example_plan: Path) -> Path:
    path = tmp_path / "job.json"
    path.write_text(
        json.dumps(
            {"name": "edge", "plans": [str(example_plan)], "styles": ["modern"], "seeds": [1, 2, 3], "profile": FAST}
        )
    )
    return path


@pytest.mark.postgres
@pytest.mark.slow
def test_submit_with_the_broker_down_prints_the_id_and_says_what_happens(
    job_file: Path, postgres_url: str, tmp_path: Path, models_dir: Path
) -> None:
    from tests.conftest import empty_postgres

    env = {
        "ARCHFARM_BROKER_URL": f"redis://127.0.0.1:{dead_port()}/0",
        "ARCHFARM_DATABASE_URL": postgres_url,
        "ARCHFARM_STORAGE_URL": str(tmp_path / "store"),
        "ARCHFARM_MODELS_DIR": str(models_dir),
    }
    try:
        result = archfarm("submit", str(job_file), env=env)
        assert result.returncode == 0, result.stderr
        job_id = result.stdout.strip()
        uuid.UUID(job_id)
        (warning,) = result.stderr.strip().splitlines()
        assert warning.startswith(f"archfarm: warning: job {job_id} is stored with 3 task(s), but the broker refused")
        assert warning.endswith(f"workers send them once the broker is back (or run `archfarm retry {job_id}`)")
        engine = make_engine(postgres_url)
        with engine.connect() as connection:
            statuses = connection.execute(select(Task.status).where(Task.job_id == job_id)).scalars().all()
        engine.dispose()
        assert statuses == [TaskStatus.QUEUED] * 3
        waiting = archfarm("status", job_id, env=env)
        assert waiting.stdout.strip() == (
            f"{job_id} edge: queued (0/3 tasks rendered: queued 3); no live worker can take its tasks: start "
            "`archfarm worker` on its queue"
        )
        assert archfarm("cancel", job_id, env=env).returncode == 0
        cancelled = archfarm("status", job_id, env=env)
        assert cancelled.stdout.strip() == f"{job_id} edge: cancelled (0/3 tasks rendered: cancelled 3)"
    finally:
        empty_postgres(postgres_url)


@pytest.mark.postgres
@pytest.mark.slow
def test_worker_submit_and_api_refuse_an_outdated_schema_with_the_same_line(
    job_file: Path, fresh_database: str, tmp_path: Path, redis_url: str
) -> None:
    env = {"ARCHFARM_BROKER_URL": redis_url, "ARCHFARM_DATABASE_URL": fresh_database}
    for revision in (None, "0002"):  # never upgraded, then one migration behind
        if revision is not None:
            engine = make_engine(fresh_database)
            upgrade(engine, revision)
            engine.dispose()
        worker = archfarm("worker", "--devices", "cpu", env=env)
        submit = archfarm("submit", str(job_file), env=env)
        api = archfarm("api", "--port", str(dead_port()), env=env)
        expected = f"database schema is at {revision or 'nothing'}, this archfarm needs"
        for result in (worker, submit, api):
            assert result.returncode == 2
            (line,) = result.stderr.strip().splitlines()
            assert line.startswith(f"archfarm: error: {expected}") and line.endswith("run `archfarm db upgrade`")
    engine = make_engine(fresh_database)
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(Job)) == 0
    engine.dispose()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.slow
def test_a_worker_refuses_a_device_the_machine_does_not_have(tmp_path: Path, redis_url: str) -> None:
    env = {"ARCHFARM_BROKER_URL": redis_url, "ARCHFARM_DATABASE_URL": f"sqlite:///{tmp_path / 'farm.db'}"}
    result = archfarm("worker", "--devices", "cuda:0", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "archfarm: error: --devices 'cuda:0': this machine has no usable CUDA GPU; cannot use cuda:0"
    ]


def test_each_launcher_on_a_host_is_a_node_of_its_own(tmp_path: Path) -> None:
    first, first_lock = claim_node("cpu0", "host", tmp_path)
    second, second_lock = claim_node("cpu0", "host", tmp_path)
    other, other_lock = claim_node("cuda0", "host", tmp_path)
    assert (first, second, other) == ("archfarm-cpu0@host", "archfarm-cpu0.1@host", "archfarm-cuda0@host")
    os.close(first_lock)  # that launcher and its workers are gone: a restart takes the name back
    again, again_lock = claim_node("cpu0", "host", tmp_path)
    assert again == "archfarm-cpu0@host"
    for fd in (second_lock, other_lock, again_lock):
        os.close(fd)


@pytest.mark.slow
def test_submit_without_a_broker_says_it_renders_here(job_file: Path, tmp_path: Path, models_dir: Path) -> None:
    env = {
        "ARCHFARM_DATABASE_URL": f"sqlite:///{tmp_path / 'farm.db'}",
        "ARCHFARM_STORAGE_URL": str(tmp_path / "out"),
        "ARCHFARM_MODELS_DIR": str(models_dir),
        "HF_HUB_OFFLINE": "1",
    }
    result = archfarm("submit", str(job_file), env=env)
    assert result.returncode == 0
    assert result.stderr.strip().splitlines() == [
        "archfarm: warning: no broker configured (ARCHFARM_BROKER_URL): rendering the job in this process now, as "
        f"`archfarm render --job {job_file}` would, into {tmp_path / 'out'}"
    ]
    job_id = result.stdout.strip()
    status = archfarm("status", job_id, env=env)
    summary, consistency = status.stdout.strip().splitlines()
    assert summary == f"{job_id} edge: succeeded (3/3 tasks rendered: succeeded 3)"
    assert consistency.startswith("  consistency ") and consistency.endswith(" over 3 images")


@pytest.mark.slow
def test_cancelling_a_finished_job_says_so_and_keeps_its_status(
    job_file: Path, tmp_path: Path, models_dir: Path
) -> None:
    env = {
        "ARCHFARM_DATABASE_URL": f"sqlite:///{tmp_path / 'farm.db'}",
        "ARCHFARM_STORAGE_URL": str(tmp_path / "out"),
        "ARCHFARM_MODELS_DIR": str(models_dir),
        "HF_HUB_OFFLINE": "1",
    }
    rendered = archfarm("render", "--job", str(job_file), "--out", str(tmp_path / "out"), env=env)
    assert rendered.returncode == 0 and rendered.stderr == ""  # no library's notices either
    job_id = rendered.stdout.split()[1].rstrip(":")
    cancel = archfarm("cancel", job_id, env=env)
    assert cancel.returncode == 0 and cancel.stdout.strip() == f"{job_id}: already succeeded; nothing to cancel"
    status = archfarm("status", job_id, "--json", env=env)
    assert json.loads(status.stdout)["status"] == "succeeded"


@pytest.mark.postgres
def test_db_upgrade_of_a_database_that_does_not_exist_says_how_to_create_it(postgres_url: str) -> None:
    from sqlalchemy.engine import make_url

    name = f"archfarm_missing_{uuid.uuid4().hex[:10]}"
    url = make_url(POSTGRES_ADMIN_URL).set(database=name)
    result = archfarm("db", "upgrade", env={"ARCHFARM_DATABASE_URL": url.render_as_string(hide_password=False)})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"archfarm: error: database '{name}' does not exist at {url.render_as_string(hide_password=True)}: create "
        f"it first (createdb -h {url.host} -p {url.port or 5432} -U {url.username} {name})"
    )
