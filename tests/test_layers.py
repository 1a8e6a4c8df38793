"""The import layers hold (`lint-imports` runs the same contracts in CI), and the API process stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_the_import_contracts_hold() -> None:
    """producer → workers → shared and never back; the engine knows nothing above it; no module cycles."""
    command = [str(Path(sys.executable).with_name("lint-imports"))]  # beside this interpreter, in its environment
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]


def test_the_api_imports_neither_torch_nor_diffusers() -> None:
    """A control host serves the REST API and the dashboard without the render stack."""
    probe = "import sys, producer.api; print(sorted({'torch', 'diffusers', 'cv2'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300)
    assert result.stdout.strip() == "[]", result.stderr
