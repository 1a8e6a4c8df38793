"""Checkpoints of a training run in the run's storage (a folder or an s3:// prefix), safe to kill at any time.

Each is `checkpoints/step-NNNNNNNN/`: what `accelerate.Accelerator.save_state` writes (weights, optimiser,
learning-rate schedule, RNG states, and the run's own state: step, data position, skipped rows), uploaded
file by file, then `complete.json` last. Only a checkpoint with that marker counts, so a run killed while
uploading resumes from the one before.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from shared.storage import Storage

PREFIX = "checkpoints/"
MARKER = "complete.json"
_STEP = re.compile(r"checkpoints/step-(\d{8})/" + re.escape(MARKER))


def folder(step: int) -> str:
    return f"{PREFIX}step-{step:08d}/"


def complete(storage: Storage) -> list[int]:
    """Steps of the complete checkpoints, oldest first."""
    return sorted(int(m.group(1)) for key in storage.list(PREFIX) if (m := _STEP.fullmatch(key)))


def save(storage: Storage, step: int, local: Path) -> None:
    """Upload the checkpoint written to `local`, then mark it complete."""
    files = sorted(path for path in local.rglob("*") if path.is_file())
    for path in files:
        storage.put_file(folder(step) + path.relative_to(local).as_posix(), path)
    marker = {"step": step, "files": [path.relative_to(local).as_posix() for path in files]}
    storage.put(folder(step) + MARKER, json.dumps(marker).encode(), "application/json")


def load(storage: Storage, step: int, local: Path) -> Path:
    """Download checkpoint `step` into a fresh `local` folder, for `Accelerator.load_state`."""
    shutil.rmtree(local, ignore_errors=True)
    marker = json.loads(storage.get(folder(step) + MARKER))
    for name in marker["files"]:
        target = local / name
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.get_file(folder(step) + name, target)
    return local


def prune(storage: Storage, keep: int) -> None:
    """Delete all but the latest `keep` complete checkpoints (marker first: a half-deleted one is not used)."""
    for step in complete(storage)[:-keep]:
        keys = storage.list(folder(step))
        storage.delete(folder(step) + MARKER)
        for key in keys:
            if not key.endswith(MARKER):
                storage.delete(key)
