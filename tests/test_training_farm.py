"""A training job on a real farm: its own pool, progress in `status`, a worker SIGKILLed mid-run whose
successor resumes from the last checkpoint, and a render profile naming the published result by URL."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from producer.cli import app
from producer.client import Farm
from producer.views import TrainingProgress
from shared.config import Settings
from shared.db.models import Job, JobKind, Task
from shared.db.status import JobStatus
from shared.errors import SubmitWarning
from shared.storage import open_storage_from_settings
from tests.processes import WorkerProcess, alive, children_of, wait_for, wait_for_value
from tests.test_farm import pid_of
from workers.training import checkpoints
from workers.training.synthetic import BOX_PROMPT, write_boxes

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.s3, pytest.mark.slow]


def test_a_training_job_runs_on_its_pool_survives_a_killed_worker_and_its_model_renders(
    farm: Farm, start_workers: Callable[..., WorkerProcess], s3_bucket: str, tmp_path: Path, example_plan: Path
) -> None:
    settings = Settings()
    write_boxes(tmp_path / "data", 12, 64)
    dataset = open_storage_from_settings(settings, f"s3://{s3_bucket}/datasets/boxes")
    for path in (p for p in (tmp_path / "data").rglob("*") if p.is_file()):
        dataset.put(path.relative_to(tmp_path / "data").as_posix(), path.read_bytes())
    output = f"s3://{s3_bucket}/training/boxes"
    spec = {
        "kind": "train",
        "name": "boxes",
        "train": {
            "base": "tiny-sd15",
            "dataset": f"s3://{s3_bucket}/datasets/boxes",
            "resolution": 64,
            "batch_size": 2,
            "learning_rate": 1e-3,
            "max_steps": 60,
            "checkpoint_every": 4,
        },
        "output": output,
    }
    job_id = farm.submit(spec)
    with farm.sessions() as session:  # a job of its own kind, whose one task names no plan, style or seed
        assert session.scalar(select(Job.kind).where(Job.id == job_id)) is JobKind.TRAIN
        assert session.execute(select(Task.plan_url, Task.style, Task.seeds).where(Task.job_id == job_id)).one() == (
            None,
            None,
            None,
        )

    first = start_workers("cpu:1", 1, "--pool", "train")
    view = wait_for_value(lambda: _past(farm, job_id, 6), 120, "training to pass its first checkpoint")
    status = CliRunner().invoke(app, ["status", job_id])
    assert status.exit_code == 0 and "training step" in status.stdout and "loss" in status.stdout, status.output
    # The whole worker dies, its launcher first (so nothing hands the task back): the next worker's reaper does.
    main = pid_of(farm, wait_for_value(lambda: _holder(farm, job_id), 10, "the task's worker"))
    pool = children_of(main)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    os.kill(main, signal.SIGKILL)
    wait_for(lambda: not any(alive(pid) for pid in pool), 10, "the pool process to die with its worker")
    reached = view.training.step

    second = start_workers("cpu:1", 1, "--pool", "train")
    done = farm.wait(job_id, timeout=240)
    assert done.status is JobStatus.SUCCEEDED, (done.failures, second.log.read_text()[-3000:])
    assert done.training.step == 60 and done.training.model_url == f"{output}/controlnet"
    log = second.log.read_text()
    assert "resumed boxes from step" in log
    resumed_from = int(log.split("resumed boxes from step ", 1)[1].split()[0])
    assert 4 <= resumed_from <= reached + 4 and resumed_from % 4 == 0
    storage = open_storage_from_settings(settings, output)
    assert checkpoints.complete(storage)[-1] == 60

    # A profile names the result by URL: fetched into the worker's model cache, pinned by its manifest.
    render = farm.submit(
        {
            "plans": [str(example_plan)],
            "styles": [{"name": "boxes", "prompt": BOX_PROMPT}],
            "seeds": [1],
            "pool": "train",
            "profile": {
                "base": "tiny-sd15",
                "controls": [{"kind": "canny", "model": done.training.model_url}],
                "steps": 2,
                "width": 64,
                "height": 64,
            },
        }
    )
    rendered = farm.wait(render, timeout=120)
    assert rendered.status is JobStatus.SUCCEEDED, rendered.failures


def test_a_queued_training_jobs_status_names_its_model_and_holds_no_database_connection(
    farm: Farm, tmp_path: Path
) -> None:
    write_boxes(tmp_path / "data", 2, 64)
    spec = {
        "kind": "train",
        "train": {"base": "tiny-sd15", "dataset": str(tmp_path / "data"), "resolution": 64, "max_steps": 2},
    }
    with pytest.warns(SubmitWarning, match="every worker of pool 'train' must see it"):
        job_id = farm.submit({**spec, "name": "boxes", "output": str(tmp_path / "out")})
    assert farm.status(job_id).training == TrainingProgress(model_url=(tmp_path / "out").as_uri() + "/controlnet")
    # A connection left checked out sits idle in a transaction, and its locks stall every TRUNCATE and migration.
    assert farm.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def _past(farm: Farm, job_id: str, step: int):  # type: ignore[no-untyped-def]
    view = farm.status(job_id)
    return view if view.training and (view.training.step or 0) >= step else None


def _holder(farm: Farm, job_id: str) -> str | None:
    with farm.sessions() as session:
        return session.scalar(select(Task.worker).where(Task.job_id == job_id))
