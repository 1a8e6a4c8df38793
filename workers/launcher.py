"""`archfarm worker`: one Celery worker process per device, each pinned with CUDA_VISIBLE_DEVICES.

The launcher itself never initialises CUDA (it only counts devices) and never forks a process that could
inherit a CUDA context: workers are fresh interpreters. Children die with the launcher (SIGTERM on parent
death: a warm shutdown), and the launcher forwards SIGTERM and SIGINT, so the second Ctrl-C stops at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

from shared.errors import InvalidInput


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
        threads = str(max(1, (os.cpu_count() or 1) // count))
        env = {"CUDA_VISIBLE_DEVICES": "", "ARCHFARM_DEVICE": "cpu", "OMP_NUM_THREADS": threads}
        return [Device(f"cpu{i}", env) for i in range(count)]
    if kind == "cuda" and rest:
        ids = [part.strip() for part in rest.split(",")]
        if not all(i.isdigit() for i in ids) or len(set(ids)) != len(ids):
            raise InvalidInput(f"--devices {spec!r}: expected distinct GPU indices like cuda:0,1")
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


def launch(devices: list[Device], queues: list[str]) -> int:
    """Run one worker process per device until all have stopped; returns the worst exit code."""
    host = socket.gethostname()
    code = f"from workers.celery_worker import main; main({queues!r})"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, **device.env, "ARCHFARM_WORKER_NODE": f"archfarm-{device.name}@{host}"},
            start_new_session=True,  # a terminal's Ctrl-C reaches us only; we forward it once per press
            preexec_fn=_term_with_parent if sys.platform == "linux" else None,
        )
        for device in devices
    ]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # A child killed by a signal has a negative code: it counts as a failure too.
    return max(abs(child.wait()) for child in children)
