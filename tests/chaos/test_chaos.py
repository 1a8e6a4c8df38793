"""Faults a farm meets overnight, on real processes and services; each job must end by itself.

Kill storms (pool processes, worker main processes and whole worker trees SIGKILLed, killed workers
restarted at once) on three hosts and on one; Redis killed and restarted without persistence; PostgreSQL
stopped; the S3 server stopped; a job stored while the broker refused its messages; a worker started with a
device the machine lacks. Each scenario asserts that
the job ends with every task succeeded, exactly one artifact row per seed and one object per output key,
nothing stranded, and that no `archfarm retry` was needed. The short form runs in CI; `ARCHFARM_CHAOS=long`
runs the issue's sizes (200 tasks, 20 kills, 20 s and 30 s outages).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from producer.client import Farm
from shared.config import Settings
from shared.errors import SubmitWarning
from tests.chaos.farm import ChaosFarm, Outcome
from tests.chaos.modes import LONG
from tests.chaos.services import PrivatePostgres, PrivateRedis, PrivateS3

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

PROFILE = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 16, "controls": [{"kind": "canny"}]}
SEEDS = 100 if LONG else 30  # × 2 styles: 200 tasks in the long form
KILLS = 20 if LONG else 6
POSTGRES_DOWN_S = 20 if LONG else 6
S3_DOWN_S = 30 if LONG else 6
REDIS_DOWN_S = 10 if LONG else 3
JOB_TIMEOUT_S = 900 if LONG else 300


@contextmanager
def a_farm(
    folder: Path, services: tuple[PrivatePostgres, PrivateRedis, PrivateS3], models_dir: Path
) -> Iterator[ChaosFarm]:
    farm = ChaosFarm(folder, *services, models_dir)
    try:
        yield farm
    except BaseException:
        print(farm.logs())
        raise
    finally:
        farm.close()


@pytest.fixture
def chaos(
    chaos_services: tuple[PrivatePostgres, PrivateRedis, PrivateS3], tmp_path: Path, models_dir: Path
) -> Iterator[ChaosFarm]:
    """A farm of its own, for a scenario that kills its workers."""
    with a_farm(tmp_path, chaos_services, models_dir) as farm:
        yield farm


@pytest.fixture(scope="module")
def survivors(
    chaos_services: tuple[PrivatePostgres, PrivateRedis, PrivateS3],
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
) -> Iterator[ChaosFarm]:
    """Three workers on three hosts that live through every outage scenario, one job each."""
    with a_farm(tmp_path_factory.mktemp("outages"), chaos_services, models_dir) as farm:
        farm.start_workers(3, hosts=True)
        yield farm


def settle(outcome: Outcome, outcomes: list[Outcome]) -> None:
    outcomes.append(outcome)
    assert (outcome.lost, outcome.duplicated, outcome.stranded) == (0, 0, 0), outcome
    assert outcome.succeeded == outcome.tasks == 2 * SEEDS


@pytest.mark.parametrize("hosts", [True, False], ids=["3-hosts", "1-host"])
def test_kill_storm(chaos: ChaosFarm, example_plan: Path, outcomes: list[Outcome], hosts: bool) -> None:
    chaos.start_workers(3, hosts=hosts)
    job_id = chaos.submit(example_plan, SEEDS, PROFILE)
    chaos.wait_for(lambda: chaos.counts(job_id)["succeeded"] > 0, 120, "the first task to finish")
    faults = chaos.kill_storm(KILLS, job_id, random.Random(f"{hosts}-{KILLS}"))
    last_fault = chaos.now()
    chaos.wait_done(job_id, JOB_TIMEOUT_S)
    assert len(faults) == KILLS, f"the job ended after {len(faults)} kills: make its tasks slower"
    settle(chaos.outcome(f"kill storm, {3 if hosts else 1} host(s)", job_id, last_fault, faults), outcomes)


OUTAGES = {"redis": REDIS_DOWN_S, "postgres": POSTGRES_DOWN_S, "s3": S3_DOWN_S}


@pytest.mark.parametrize("service", list(OUTAGES))
def test_a_service_down_mid_job(
    survivors: ChaosFarm, example_plan: Path, outcomes: list[Outcome], service: str
) -> None:
    """Redis is killed (no persistence: every message in it, queued or held by a worker, is gone);
    PostgreSQL and the S3 server are stopped as an operator would. Then each comes back."""
    down = {"redis": survivors.redis, "postgres": survivors.postgres, "s3": survivors.s3}[service]
    job_id = survivors.submit(example_plan, SEEDS, PROFILE)
    survivors.wait_for(lambda: survivors.counts(job_id)["succeeded"] >= 5, 120, "the job to get going")
    logged = {worker.log: worker.log.stat().st_size for worker in survivors.workers}
    down.stop()
    time.sleep(OUTAGES[service])
    down.start()
    survivors.wait_for(survivors.now, 60, "the database to answer")
    back = survivors.now()
    survivors.wait_done(job_id, JOB_TIMEOUT_S)
    settle(survivors.outcome(f"{service} down {OUTAGES[service]} s", job_id, back, [service]), outcomes)
    if service == "postgres":  # a line when the outage starts and one when it ends, per process: no tracebacks
        for log, size in logged.items():
            during = log.read_bytes()[size:].decode(errors="replace")
            assert "Traceback" not in during, during
            assert during.count("database unreachable, retrying until it answers") <= 2, during  # main and pool


def test_a_worker_with_a_wrong_device_takes_nothing(
    survivors: ChaosFarm, example_plan: Path, outcomes: list[Outcome]
) -> None:
    job_id = survivors.submit(example_plan, SEEDS, PROFILE)
    wrong = subprocess.run(
        [sys.executable, "-m", "producer.cli", "worker", "--devices", "cuda:0"],
        env={**os.environ, **survivors.env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert wrong.returncode == 2 and "cannot use cuda:0" in wrong.stderr
    refused = survivors.now()
    survivors.wait_done(job_id, JOB_TIMEOUT_S)
    assert survivors.live_workers() == 3
    settle(survivors.outcome("worker with a wrong device", job_id, refused, ["cuda:0 worker"]), outcomes)


def test_a_job_stored_while_the_broker_was_down_runs_without_a_retry(
    survivors: ChaosFarm, example_plan: Path, outcomes: list[Outcome]
) -> None:
    """Submit stores the job, the broker refuses every message (as when a submit is killed half-way through
    sending, or Redis is away): the sweeper finds the tasks without messages and sends them."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        nowhere = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    with Farm(Settings(broker_url=nowhere)) as cut_off, pytest.warns(SubmitWarning, match="the broker refused"):
        job_id = cut_off.submit(
            {
                "plans": [str(example_plan)],
                "styles": ["modern", "japandi"],
                "seeds": {"count": SEEDS},
                "profile": PROFILE,
            }
        )
    stored = survivors.now()
    survivors.wait_done(job_id, JOB_TIMEOUT_S)
    settle(survivors.outcome("submit with the broker down", job_id, stored, ["broker"]), outcomes)
