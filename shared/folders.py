"""A folder that appears whole or not at all, however many processes race to make it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def built_once(target: Path, fill: Callable[[Path], None]) -> Path:
    """`target`, made by `fill` into a staging folder beside it and renamed into place (atomic: a reader never
    sees half of it). A process that loses the race throws its copy away; `fill`'s errors leave nothing."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target so the rename stays on one filesystem; a dot keeps it out of listings.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fill(staging)
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
