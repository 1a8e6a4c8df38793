"""docker/compose.yaml: validated by `docker-compose config` (no Docker engine needed) and checked for the
properties that matter on a GPU farm: each worker reserves exactly its own GPU, every archfarm process
sees the same settings, and nothing starts before the database schema is upgraded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
WORKER_GPUS = {"worker-gpu0": ["0"], "worker-gpu1": ["1"]}
# Variables compose would substitute: unset so the defaults in the file are what gets checked.
INTERPOLATED = ("ARCHFARM_", "AWS_", "COMPOSE_", "DOCKER_", "SEAWEEDFS_IMAGE")


def _compose_binary() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        reason = "docker-compose not found (apt-get install -y docker-compose)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"required tool missing under CI: {reason}", pytrace=False)
        pytest.skip(reason)
    return found


def _config(compose_file: Path) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` on a file; relative paths in it resolve against docker/ wherever it lies."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(INTERPOLATED)}
    return subprocess.run(
        [_compose_binary(), "-f", str(compose_file), "--project-directory", str(DOCKER_DIR), "config"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    result = _config(COMPOSE_FILE)
    assert result.returncode == 0, f"docker-compose config rejected {COMPOSE_FILE}:\n{result.stderr}"
    return yaml.safe_load(result.stdout)["services"]


def _device_ids(service: dict[str, Any]) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [str(i) for device in devices for i in device.get("device_ids", [])]


def test_each_worker_reserves_only_its_own_gpu(services: dict[str, Any]) -> None:
    reserved = {name: ids for name, service in services.items() if (ids := _device_ids(service))}
    assert reserved == WORKER_GPUS
    for name in WORKER_GPUS:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert [(d["driver"], d["capabilities"]) for d in devices] == [("nvidia", ["gpu"])]


def test_workers_stop_gracefully(services: dict[str, Any]) -> None:
    for name in WORKER_GPUS:
        assert services[name].get("init") is True, name
        # Compose's default is 10 s; a render takes minutes. v1 prints "10m", v2 "10m0s".
        grace = services[name].get("stop_grace_period", "10s")
        seconds = sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"(\d+)([hms])", grace))
        assert seconds >= 300, (name, grace)
        assert ("models", "/models") in map(_mount, services[name]["volumes"]), name


def _mount(volume: str | dict[str, Any]) -> tuple[str, str]:
    """(source, target) of a volume in v1's short form or v2's long one."""
    if isinstance(volume, dict):
        return volume["source"], volume["target"]
    source, target, *_ = volume.split(":")
    return source, target


def test_api_migrate_and_workers_share_settings(services: dict[str, Any]) -> None:
    def settings(name: str) -> dict[str, str]:
        env = services[name]["environment"]
        return {k: v for k, v in env.items() if k.startswith(("ARCHFARM_", "AWS_"))}

    api = settings("api")
    assert {"ARCHFARM_BROKER_URL", "ARCHFARM_DATABASE_URL", "ARCHFARM_STORAGE_URL", "ARCHFARM_S3_ENDPOINT_URL"} <= set(
        api
    )
    assert api["ARCHFARM_DATABASE_URL"].startswith("postgresql+psycopg://")
    for name in ["migrate", *WORKER_GPUS]:
        assert settings(name) == api, name


def test_api_waits_for_a_successful_migration(services: dict[str, Any]) -> None:
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_a_typo_is_rejected(tmp_path: Path) -> None:
    text = COMPOSE_FILE.read_text()
    assert "\n    image: redis:7\n" in text
    # The untouched copy must pass from tmp_path too, so the typo is the only reason for a rejection.
    (tmp_path / "good.yaml").write_text(text)
    good = _config(tmp_path / "good.yaml")
    assert good.returncode == 0, good.stderr
    (tmp_path / "bad.yaml").write_text(text.replace("\n    image: redis:7\n", "\n    imagex: redis:7\n", 1))
    bad = _config(tmp_path / "bad.yaml")
    assert bad.returncode != 0
    assert "imagex" in bad.stderr
