"""Faults a farm meets overnight, on real processes and services; each job must end by itself.

Kill storms (pool processes, worker main processes and whole worker trees SIGKILLed, killed workers
restarted at once) on three hosts and on one; the broker killed and restarted (Redis without persistence,
Redis with AOF, RabbitMQ with quorum queues); PostgreSQL stopped; the S3 server stopped; a job stored while
the broker refused its messages; a worker started with a device the machine lacks. Each scenario asserts
that the job ends with every task succeeded, exactly one artifact row per seed and one object per output key,
nothing stranded, and that no `archfarm retry` was needed. The short form runs in CI, on Redis, with
RabbitMQ's own outage besides; `ARCHFARM_CHAOS=long` runs the issue's sizes (200 tasks, 20 kills, 20 s and
30 s outages) on each of the three brokers.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from producer.client import Farm
from shared.config import Settings
from shared.errors import SubmitWarning
from tests.chaos.farm import ChaosFarm, Outcome
from tests.chaos.modes import BROKERS, LONG
from tests.chaos.services import Broker, PrivatePostgres, PrivateS3

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

PROFILE = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 16, "controls": [{"kind": "canny"}]}
SEEDS = 100 if LONG else 30  # × 2 styles: 200 tasks in the long form
KILLS = 20 if LONG else 6
POSTGRES_DOWN_S = 20 if LONG else 6
S3_DOWN_S = 30 if LONG else 6
BROKER_DOWN_S = 10 if LONG else 3
JOB_TIMEOUT_S = 900 if LONG else 300


@contextmanager
def a_farm(
    folder: Path, services: tuple[PrivatePostgres, PrivateS3], broker: Broker, models_dir: Path
) -> Iterator[ChaosFarm]:
    postgres, s3 = services
    farm = ChaosFarm(folder, postgres, broker, s3, models_dir)
    try:
        yield farm
    except BaseException:
        print(farm.logs())
        raise
    finally:
        farm.close()


@pytest.fixture
def chaos(
    chaos_services: tuple[PrivatePostgres, PrivateS3],
    chaos_brokers: Callable[[str], Broker],
    tmp_path: Path,
    models_dir: Path,
) -> Iterator[Callable[[str], ChaosFarm]]:
    """A farm of its own on a broker, for a scenario that kills its workers."""
    with ExitStack() as stack:
        yield lambda broker: stack.enter_context(a_farm(tmp_path, chaos_services, chaos_brokers(broker), models_dir))


@pytest.fixture(scope="module")
def survivors(
    chaos_services: tuple[PrivatePostgres, PrivateS3],
    chaos_brokers: Callable[[str], Broker],
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
) -> Iterator[Callable[[str], ChaosFarm]]:
    """Three workers on three hosts on a broker, living through every outage scenario, one job each. One such
    farm at a time: asking for another broker's closes the last one (the scenarios run grouped by broker)."""
    current: dict[str, tuple[ExitStack, ChaosFarm]] = {}

    def on(broker: str) -> ChaosFarm:
        if broker not in current:
            for stack, _ in current.values():
                stack.close()
            current.clear()
            stack = ExitStack()
            folder = tmp_path_factory.mktemp(f"outages-{broker}")
            farm = stack.enter_context(a_farm(folder, chaos_services, chaos_brokers(broker), models_dir))
            current[broker] = (stack, farm)
            farm.start_workers(3, hosts=True)
        return current[broker][1]

    yield on
    for stack, _ in current.values():
        stack.close()


def settle(outcome: Outcome, outcomes: list[Outcome]) -> None:
    outcomes.append(outcome)
    assert (outcome.lost, outcome.duplicated, outcome.stranded) == (0, 0, 0), outcome
    assert outcome.succeeded == outcome.tasks == 2 * SEEDS


@pytest.mark.parametrize("broker", BROKERS)
@pytest.mark.parametrize("hosts", [True, False], ids=["3-hosts", "1-host"])
def test_kill_storm(
    chaos: Callable[[str], ChaosFarm], example_plan: Path, outcomes: list[Outcome], hosts: bool, broker: str
) -> None:
    chaos = chaos(broker)
    chaos.start_workers(3, hosts=hosts)
    job_id = chaos.submit(example_plan, SEEDS, PROFILE)
    chaos.wait_for(lambda: chaos.counts(job_id)["succeeded"] > 0, 120, "the first task to finish")
    faults = chaos.kill_storm(KILLS, job_id, random.Random(f"{hosts}-{KILLS}"))
    last_fault = chaos.now()
    chaos.wait_done(job_id, JOB_TIMEOUT_S)
    assert len(faults) == KILLS, f"the job ended after {len(faults)} kills: make its tasks slower"
    scenario = f"kill storm, {3 if hosts else 1} host(s)"
    settle(chaos.outcome(scenario, broker, job_id, last_fault, faults), outcomes)


OUTAGES = {"broker": BROKER_DOWN_S, "postgres": POSTGRES_DOWN_S, "s3": S3_DOWN_S}
OUTAGE_CASES = [(broker, service) for broker in BROKERS for service in OUTAGES]
if "rabbitmq" not in BROKERS:
    OUTAGE_CASES.append(("rabbitmq", "broker"))  # the one RabbitMQ scenario of the short form


@pytest.mark.parametrize(("broker", "service"), OUTAGE_CASES)
def test_a_service_down_mid_job(
    survivors: Callable[[str], ChaosFarm], example_plan: Path, outcomes: list[Outcome], broker: str, service: str
) -> None:
    """The broker is killed (Redis without persistence loses every message in it, queued or held by a worker;
    with AOF it reads them back; RabbitMQ's quorum queues keep theirs on disk); PostgreSQL and the S3 server
    are stopped as an operator would. Then each comes back."""
    survivors = survivors(broker)
    down = {"broker": survivors.broker, "postgres": survivors.postgres, "s3": survivors.s3}[service]
    job_id = survivors.submit(example_plan, SEEDS, PROFILE)
    survivors.wait_for(lambda: survivors.counts(job_id)["succeeded"] >= 5, 120, "the job to get going")
    logged = {worker.log: worker.log.stat().st_size for worker in survivors.workers}
    down.stop()
    time.sleep(OUTAGES[service])
    down.start()
    survivors.wait_for(survivors.now, 60, "the database to answer")
    back = survivors.now()
    survivors.wait_done(job_id, JOB_TIMEOUT_S)
    settle(survivors.outcome(f"{service} down {OUTAGES[service]} s", broker, job_id, back, [service]), outcomes)
    if service == "postgres":  # a line when the outage starts and one when it ends, per process: no tracebacks
        for log, size in logged.items():
            during = log.read_bytes()[size:].decode(errors="replace")
            assert "Traceback" not in during, during
            assert during.count("database unreachable, retrying until it answers") <= 2, during  # main and pool


@pytest.mark.parametrize("broker", BROKERS)
def test_a_worker_with_a_wrong_device_takes_nothing(
    survivors: Callable[[str], ChaosFarm], example_plan: Path, outcomes: list[Outcome], broker: str
) -> None:
    survivors = survivors(broker)
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
    settle(survivors.outcome("worker with a wrong device", broker, job_id, refused, ["cuda:0 worker"]), outcomes)


@pytest.mark.parametrize("broker", BROKERS)
def test_a_job_stored_while_the_broker_was_down_runs_without_a_retry(
    survivors: Callable[[str], ChaosFarm], example_plan: Path, outcomes: list[Outcome], broker: str
) -> None:
    """Submit stores the job, the broker refuses every message (as when a submit is killed half-way through
    sending, or the broker is away): the sweeper finds the tasks without messages and sends them."""
    survivors = survivors(broker)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nowhere = f"amqp://guest:guest@127.0.0.1:{port}//" if broker == "rabbitmq" else f"redis://127.0.0.1:{port}/0"
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
    settle(survivors.outcome("submit with the broker down", broker, job_id, stored, ["broker"]), outcomes)
