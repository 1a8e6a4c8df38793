"""The `archfarm worker` processes a test starts, their process trees (read from /proc, Linux) for killing
exactly what a fault needs, and waiting on conditions with a bound."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select

from producer.client import Farm
from shared.db.models import Worker


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


class WorkerProcess:
    """An `archfarm worker` launcher and what it started."""

    def __init__(self, env: dict[str, str], devices: str, log: Path, *options: str) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "worker", "--devices", devices, *options],
            env={**os.environ, **env},
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        self.terminate()
        self.wait()

    def terminate(self) -> None:
        """SIGTERM: a warm shutdown (`wait` for it), so several workers can stop at once."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self) -> None:
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def live_workers(farm: Farm) -> int:
    with farm.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Worker).where(Worker.stopped_at.is_(None))) or 0)


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for_value(get: Callable[[], object], timeout: float, what: str):  # type: ignore[no-untyped-def]
    found: list[object] = []
    wait_for(lambda: found.append(get()) or found[-1], timeout, what)
    return found[-1]
