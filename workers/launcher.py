"""`archfarm worker`: one Celery worker process per device, each pinned with CUDA_VISIBLE_DEVICES.

The launcher itself never initialises CUDA (it counts devices in a child interpreter) and never forks a
process that could inherit a CUDA context: workers are fresh interpreters. A device this machine does not
have is refused before anything starts. Children die with the launcher (SIGTERM on parent death: a warm
shutdown), and the launcher forwards SIGTERM and SIGINT, so the second Ctrl-C stops at once.

Each worker process is a node of its own (`archfarm-cpu0@host`, `archfarm-cpu0.1@host` for a second
launcher of the same device on that host): blocklists are per node, and two launchers must not pool their
failures. A node name is a slot held with a file lock for as long as the launcher or its workers live, so
a restarted launcher takes its old name back once the old processes are gone.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from shared.config import Settings
from shared.errors import ConfigError, InvalidInput
from workers.upkeep import release

MAX_SLOTS = 64


@dataclass(frozen=True)
class Device:
    """One worker's device: its name in the node id, and the environment that pins it."""

    name: str
    env: dict[str, str]


def parse_devices(spec: str) -> list[Device]:
    """`auto` (every visible GPU, else one CPU worker), `cuda:0,1`, `cpu` or `cpu:N`."""
    spec = spec.strip()
    if spec == "auto":
        count = _cuda_count()
        return parse_devices(f"cuda:{','.join(map(str, range(count)))}") if count else parse_devices("cpu")
    kind, _, rest = spec.partition(":")
    if kind == "cpu":
        try:
            count = int(rest or "1")
        except ValueError:
            raise InvalidInput(f"--devices {spec!r}: cpu:N needs a whole number of workers") from None
        if not 1 <= count <= 64:
            raise InvalidInput(f"--devices {spec!r}: between 1 and 64 CPU workers")
        # The cores shared out among this launcher's workers, unless the operator said otherwise (several
        # launchers on one host must not each take every core: oversubscribed threads crawl).
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // count))
        env = {"CUDA_VISIBLE_DEVICES": "", "ARCHFARM_DEVICE": "cpu", "OMP_NUM_THREADS": threads}
        return [Device(f"cpu{i}", env) for i in range(count)]
    if kind == "cuda" and rest:
        ids = [part.strip() for part in rest.split(",")]
        if not all(i.isdigit() for i in ids) or len(set(ids)) != len(ids):
            raise InvalidInput(f"--devices {spec!r}: expected distinct GPU indices like cuda:0,1")
        count = _cuda_count()
        missing = [i for i in ids if int(i) >= count]
        if missing:
            have = f"GPUs 0-{count - 1}" if count else "no usable CUDA GPU"
            raise ConfigError(f"--devices {spec!r}: this machine has {have}; cannot use cuda:{','.join(missing)}")
        # Inside each worker its one visible GPU is cuda:0.
        return [Device(f"cuda{i}", {"CUDA_VISIBLE_DEVICES": i, "ARCHFARM_DEVICE": "cuda:0"}) for i in ids]
    raise InvalidInput(f"--devices {spec!r}: expected auto, cuda:0,1, cpu or cpu:N")


def _cuda_count() -> int:
    """Visible GPUs, counted in a child interpreter so this process never loads the CUDA runtime."""
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    try:
        return int(result.stdout.strip() or 0)
    except ValueError:
        return 0


def _term_with_parent() -> None:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: warm shutdown if we die


def claim_node(device: str, host: str, folder: Path | None = None) -> tuple[str, int]:
    """The first free node name for `device` on this host, and the descriptor of the lock that holds it."""
    folder = folder or Path(tempfile.gettempdir()) / "archfarm-nodes"
    folder.mkdir(parents=True, exist_ok=True)
    for slot in range(MAX_SLOTS):
        name = f"archfarm-{device}@{host}" if slot == 0 else f"archfarm-{device}.{slot}@{host}"
        fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return name, fd
    raise ConfigError(f"more than {MAX_SLOTS} workers for {device} on {host}")


def launch(devices: list[Device], queues: list[str], settings: Settings) -> int:
    """Run one worker process per device until all have stopped; returns the worst exit code.

    Whatever a worker still holds when it exits, however it exits (a warm shutdown, a second Ctrl-C, a crash
    of its main process), is handed back at once by the launcher, which outlives it."""
    host = socket.gethostname()
    code = f"from workers.celery_worker import main; main({queues!r})"
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    for device in devices:
        node, lock = claim_node(device.name, host)
        worker = f"{node}#{uuid.uuid4().hex[:8]}"  # one per process start: liveness is judged per incarnation
        env = {**os.environ, **device.env, "ARCHFARM_WORKER_NODE": node, "ARCHFARM_WORKER_ID": worker}
        child = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            pass_fds=(lock,),  # the slot stays taken while the worker (or its pool) lives
            start_new_session=True,  # a terminal's Ctrl-C reaches us only; we forward it once per press
            preexec_fn=_term_with_parent if sys.platform == "linux" else None,
        )
        children.append((worker, child))

    def forward(signum: int, _frame: object) -> None:
        for _, child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = []
    for worker, child in children:
        codes.append(abs(child.wait()))  # a child killed by a signal has a negative code: a failure too
        release(settings, worker)
    return max(codes)
