"""A farm of real `archfarm worker` processes over the chaos suite's own services, with the faults it suffers.

Workers run on one host or each on a host of its own (a UTS namespace with its own hostname, as three
machines would look to archfarm). Faults are real: SIGKILL of a pool process, of a worker's main process,
or of a whole worker tree, then a restart at once, as a supervisor would do.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from producer.client import Farm
from shared.config import Settings
from shared.db.clock import aware, database_time
from shared.db.models import Artifact, Task, TaskStatus, Worker
from shared.db.session import make_engine, upgrade
from shared.db.status import JobStatus
from tests.chaos.services import Broker, PrivatePostgres, PrivateS3
from tests.processes import children_of

KILLS = ("pool", "main", "tree")


@dataclass
class Outcome:
    """What a scenario did to a job: the figures the suite asserts are zero, and how the farm recovered
    (database clock, from the end of the fault: the next task done, and the job done)."""

    scenario: str
    broker: str
    tasks: int
    succeeded: int = 0
    lost: int = 0
    duplicated: int = 0
    stranded: int = 0
    resumed_s: float = 0.0
    finished_s: float = 0.0
    faults: list[str] = field(default_factory=list)

    def row(self) -> str:
        return (
            f"{self.scenario:<28} {self.broker:<9} {self.tasks:>5} {self.succeeded:>9} {self.lost:>4} "
            f"{self.duplicated:>10} {self.stranded:>8} {self.resumed_s:>9.1f} {self.finished_s:>10.1f}  "
            f"{len(self.faults)} fault(s)"
        )


HEADER = (
    f"{'scenario':<28} {'broker':<9} {'tasks':>5} {'succeeded':>9} {'lost':>4} {'duplicated':>10} {'stranded':>8} "
    f"{'resumed_s':>9} {'finished_s':>10}"
)


class LauncherProcess:
    """One `archfarm worker --devices cpu:1` launcher, optionally alone on a host of its own."""

    def __init__(self, env: dict[str, str], log: Path, host: str | None) -> None:
        self.env, self.log, self.host = env, log, host
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        command = [sys.executable, "-m", "producer.cli", "worker", "--devices", "cpu:1"]
        if self.host is not None:
            command = ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', self.host, *command]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                command, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def main_pid(self) -> int | None:
        assert self.proc is not None
        children = children_of(self.proc.pid)
        return children[0] if children else None

    def pool_pid(self) -> int | None:
        main = self.main_pid()
        pool = children_of(main) if main is not None else []
        return pool[0] if pool else None

    def kill(self, how: str) -> bool:
        """SIGKILL part of this worker; a whole worker is restarted at once. False if that part is not up yet."""
        assert self.proc is not None
        main, pool = self.main_pid(), self.pool_pid()
        if how == "pool":
            if pool is None:
                return False
            os.kill(pool, signal.SIGKILL)
            return True
        if main is None or pool is None:
            return False
        targets = [main] if how == "main" else [self.proc.pid, main, pool]
        for pid in targets:
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(30)
        self.start()
        return True

    def kill_all(self) -> None:
        """SIGKILL the worker's whole process group (what is still up of it) and reap it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class ChaosFarm:
    """Services, settings and workers for one scenario; `close` kills the workers and empties the state."""

    def __init__(
        self,
        folder: Path,
        postgres: PrivatePostgres,
        broker: Broker,
        s3: PrivateS3,
        models_dir: Path,
        **settings: str,
    ) -> None:
        self.folder, self.postgres, self.broker, self.s3 = folder, postgres, broker, s3
        self.bucket = f"chaos-{folder.name.lower().replace('_', '-')[-40:]}".rstrip("-")
        s3.server.client().create_bucket(Bucket=self.bucket)
        self.database = f"chaos_{uuid.uuid4().hex[:12]}"
        engine = make_engine(postgres.create(self.database))
        upgrade(engine)
        engine.dispose()
        self.env = {
            "ARCHFARM_BROKER_URL": broker.url,
            "ARCHFARM_DATABASE_URL": postgres.url(self.database),
            "ARCHFARM_STORAGE_URL": f"s3://{self.bucket}/renders",
            "ARCHFARM_MODELS_DIR": str(models_dir),
            "ARCHFARM_QUEUE": "chaos",
            "ARCHFARM_HEARTBEAT_INTERVAL": "0.5",
            "ARCHFARM_HEARTBEAT_TIMEOUT": "4",
            "ARCHFARM_STRANDED_AFTER": "5",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",  # three workers share this machine's cores, as three launchers on a host would
            **s3.env,
            **settings,
        }
        self.workers: list[LauncherProcess] = []
        self._saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)  # the in-process Farm (submit, status) reads the same settings
        try:
            self.farm = Farm(Settings())
        except BaseException:
            self._restore_environment()
            raise

    def start_workers(self, count: int, *, hosts: bool) -> None:
        for index in range(count):
            log = self.folder / f"worker-{len(self.workers)}.log"
            self.workers.append(LauncherProcess(self.env, log, f"chaos-host-{index}" if hosts else None))
        self.wait_for(lambda: self.live_workers() >= count, 120, f"{count} workers to start")

    def live_workers(self) -> int:
        with self.farm.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(Worker).where(Worker.stopped_at.is_(None))) or 0)

    def submit(self, plan: Path, seeds: int, profile: dict[str, Any]) -> str:
        return self.farm.submit(
            {
                "name": "chaos",
                "plans": [str(plan)],
                "styles": ["modern", "japandi"],
                "seeds": {"count": seeds},
                "profile": profile,
            }
        )

    def counts(self, job_id: str) -> dict[str, int]:
        return self.farm.status(job_id).counts

    def wait_done(self, job_id: str, timeout: float) -> None:
        """Wait (through outages: a failed poll is retried) until the job has ended."""
        self.wait_for(
            lambda: self.farm.status(job_id).status not in (JobStatus.QUEUED, JobStatus.RUNNING),
            timeout,
            f"job {job_id} to end",
        )

    def wait_for(self, condition: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except Exception:  # noqa: BLE001 - the database may be the fault being injected
                pass
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; worker logs in {self.folder}")

    def kill_storm(self, kills: int, job_id: str, rng: random.Random) -> list[str]:
        """SIGKILL a random part of a random worker every 0.3–1.2 s until `kills` are done or the job ends."""
        done: list[str] = []
        while len(done) < kills and self.farm.status(job_id).status in (JobStatus.QUEUED, JobStatus.RUNNING):
            time.sleep(rng.uniform(0.3, 1.2))
            worker, how = rng.choice(self.workers), rng.choice(KILLS)
            if worker.kill(how):
                done.append(f"{how}:{self.workers.index(worker)}")
        return done

    def now(self) -> datetime:
        """The database's time: when a fault ended, on the clock the task rows use."""
        with self.farm.sessions() as session:
            return database_time(session)

    def outcome(self, scenario: str, broker: str, job_id: str, fault_end: datetime, faults: list[str]) -> Outcome:
        """Count what the suite promises: every task succeeded once, one artifact row per seed, one object
        per output key, nothing queued or running."""
        with self.farm.sessions() as session:
            tasks = session.execute(select(Task.status, Task.outputs).where(Task.job_id == job_id)).all()
            after = [
                (aware(t) - fault_end).total_seconds()
                for t in session.scalars(select(Task.finished_at).where(Task.job_id == job_id))
                if t is not None and aware(t) > fault_end
            ]
            artifacts = session.execute(select(Artifact.url).where(Artifact.job_id == job_id)).scalars().all()
        expected = {key for _, outputs in tasks for key in outputs}
        listing = self.s3.server.client().get_paginator("list_objects_v2")
        prefix = f"renders/{job_id}/"
        keys = [
            o["Key"] for page in listing.paginate(Bucket=self.bucket, Prefix=prefix) for o in page.get("Contents", [])
        ]
        pngs = [k.removeprefix(prefix) for k in keys if k.endswith(".png")]
        sidecars = [k for k in keys if k.endswith(".json")]
        succeeded = sum(1 for status, _ in tasks if status is TaskStatus.SUCCEEDED)
        return Outcome(
            scenario=scenario,
            broker=broker,
            tasks=len(tasks),
            succeeded=succeeded,
            lost=len(tasks) - succeeded + len(expected - set(pngs)),
            duplicated=(len(artifacts) - len(set(artifacts)))
            + len(set(pngs) - expected)
            + (len(pngs) - len(set(pngs)))
            + max(0, len(sidecars) - len(expected)),
            stranded=sum(1 for status, _ in tasks if status in (TaskStatus.QUEUED, TaskStatus.RUNNING)),
            resumed_s=min(after, default=0.0),
            finished_s=max(after, default=0.0),
            faults=faults,
        )

    def _restore_environment(self) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def logs(self) -> str:
        return "\n".join(f"--- {w.log}\n{w.log.read_text(errors='replace')[-3000:]}" for w in self.workers)

    def close(self) -> None:
        for worker in self.workers:  # the farm is going: no warm shutdown to wait for (on RabbitMQ, half a minute)
            worker.kill_all()
        self.farm.close()
        self._restore_environment()
        self.postgres.drop(self.database)
        self.broker.empty()


def dump(outcomes: list[Outcome]) -> str:
    return json.dumps([o.__dict__ for o in outcomes])
