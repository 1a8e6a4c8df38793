"""docker/compose.yaml: validated by `docker-compose config` (no Docker engine needed) and checked for the
properties that matter on a GPU farm: each worker reserves exactly its own GPU, a plain `up` starts one GPU
worker and a CPU one needs no GPU at all, every archfarm process sees the same settings, the bucket is the
storage URL's, secrets come only from the env file, and nothing starts before the schema is upgraded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER_DIR = ROOT / "docker"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
ENV_EXAMPLE = DOCKER_DIR / "farm.env.example"
WORKER_GPUS = {"worker-gpu0": ["0"], "worker-gpu1": ["1"]}
WORKERS = [*WORKER_GPUS, "worker-cpu"]
# Variables compose would substitute: unset so the defaults in the file are what gets checked.
INTERPOLATED = (
    "ARCHFARM_",
    "AWS_",
    "COMPOSE_",
    "DOCKER_",
    "POSTGRES_",
    "REDIS_",
    "SEAWEEDFS_IMAGE",
    "FLOWER_",
    "PROMETHEUS_",
)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN")


def _compose_binary() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        reason = "docker-compose not found (apt-get install -y docker-compose)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"required tool missing under CI: {reason}", pytrace=False)
        pytest.skip(reason)
    return found


def _config(compose_file: Path, env_file: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` on a file; relative paths in it resolve against docker/ wherever it lies."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(INTERPOLATED)} | variables
    return subprocess.run(
        [_compose_binary(), "-f", str(compose_file), "--project-directory", str(DOCKER_DIR)]
        + ["--env-file", str(env_file), "config"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env,
    )


def _example_variables() -> dict[str, str]:
    """What farm.env.example sets, leaving out the settings it only shows in comments."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """farm.env.example with its empty secrets filled in, as a user does before the first `up`."""
    path = tmp_path_factory.mktemp("env") / "farm.env"
    filled = {name: value or f"test-{name.lower()}" for name, value in _example_variables().items()}
    path.write_text("".join(f"{name}={value}\n" for name, value in filled.items()))
    return path


def _services(env_file: Path, **variables: str) -> dict[str, Any]:
    result = _config(COMPOSE_FILE, env_file, **variables)
    assert result.returncode == 0, f"docker-compose config rejected {COMPOSE_FILE}:\n{result.stderr}"
    services: dict[str, Any] = yaml.safe_load(result.stdout)["services"]
    return services


@pytest.fixture(scope="module")
def services(env_file: Path) -> dict[str, Any]:
    return _services(env_file)


def _device_ids(service: dict[str, Any]) -> list[str]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [str(i) for device in devices for i in device.get("device_ids", [])]


def test_each_worker_reserves_only_its_own_gpu(services: dict[str, Any]) -> None:
    reserved = {name: ids for name, service in services.items() if (ids := _device_ids(service))}
    assert reserved == WORKER_GPUS
    for name in WORKER_GPUS:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert [(d["driver"], d["capabilities"]) for d in devices] == [("nvidia", ["gpu"])]


def test_a_plain_up_starts_one_gpu_worker(services: dict[str, Any]) -> None:
    """`up` starts the services without a profile: on GPU 0 only, so a one-GPU machine can run it."""
    started = {name for name, service in services.items() if not service.get("profiles")}
    assert {name for name in started if _device_ids(services[name])} == {"worker-gpu0"}
    assert "worker-cpu" not in started
    # Each further GPU has a profile of its own, so a machine enables exactly the GPUs it has.
    assert services["worker-gpu1"]["profiles"] == ["gpu1"]


def _needs(services: dict[str, Any], names: set[str]) -> set[str]:
    """`names` and everything they depend on, as `up NAME...` starts them."""
    found = set(names)
    while more := {dep for name in found for dep in services[name].get("depends_on", {})} - found:
        found |= more
    return found


def test_the_cpu_worker_needs_no_gpu(services: dict[str, Any]) -> None:
    worker = services["worker-cpu"]
    assert worker["profiles"] == ["cpu"]
    assert worker["command"] == ["--devices", "cpu"]
    assert "deploy" not in worker
    # The worker image's entrypoint is `archfarm worker`; the CPU build overrides only declared arguments.
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
    dockerfile = (DOCKER_DIR / "worker.Dockerfile").read_text()
    assert '\nENTRYPOINT ["archfarm", "worker"]\n' in dockerfile
    args = worker["build"]["args"]
    assert set(args) <= set(re.findall(r"^ARG (\w+)", dockerfile, re.MULTILINE))
    assert "nvidia" not in args["BASE_IMAGE"] and args["TORCH_INDEX"].endswith("/cpu")
    assert worker["image"] != services["worker-gpu0"]["image"]
    # `up api worker-cpu` on a machine without NVIDIA: nothing it starts asks for a GPU.
    assert not any(_device_ids(services[name]) for name in _needs(services, {"api", "worker-cpu"}))


def test_workers_stop_gracefully(services: dict[str, Any]) -> None:
    for name in WORKERS:
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
        return {k: v for k, v in env.items() if k.startswith(("ARCHFARM_", "AWS_", "PG"))}

    api = settings("api")
    expected = {"ARCHFARM_BROKER_URL", "ARCHFARM_DATABASE_URL", "ARCHFARM_STORAGE_URL", "ARCHFARM_S3_ENDPOINT_URL"}
    assert expected | {"ARCHFARM_S3_PUBLIC_ENDPOINT_URL", "PGPASSWORD"} <= set(api)
    assert api["ARCHFARM_DATABASE_URL"].startswith("postgresql+psycopg://")
    for name in ["migrate", *WORKERS]:
        assert settings(name) == api, name
    # The S3 server's admin is the identity archfarm signs with.
    s3_keys = {k: v for k, v in api.items() if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    assert services["s3"]["environment"] == s3_keys
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == api["PGPASSWORD"]


def _published(port: str | dict[str, Any]) -> tuple[str, int]:
    """(host address, host port) of a published port in v1's short form or v2's long one."""
    if isinstance(port, dict):
        return port.get("host_ip", "0.0.0.0"), int(port["published"])
    host, published, _ = port.rsplit(":", 2)
    return host, int(published)


def test_download_links_name_the_published_s3_port(services: dict[str, Any]) -> None:
    """Links signed for the in-network `s3` name would not resolve outside Docker's network."""
    public = urlsplit(services["api"]["environment"]["ARCHFARM_S3_PUBLIC_ENDPOINT_URL"])
    assert (public.hostname, public.port) in map(_published, services["s3"]["ports"])


def test_s3_init_creates_the_bucket_of_the_storage_url(env_file: Path, tmp_path: Path) -> None:
    """The s3-init script itself, run with a stand-in `aws` that records its calls and finds no bucket."""
    (tmp_path / "aws").write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n[ "$4" != head-bucket ]\n')
    (tmp_path / "aws").chmod(0o755)

    calls = tmp_path / "calls"

    def init(storage_url: str) -> tuple[int, list[str]]:
        service = _services(env_file, ARCHFARM_STORAGE_URL=storage_url)["s3-init"]
        assert service["entrypoint"] == ["/bin/sh", "-c"]
        script = service["command"][0].replace("$$", "$")  # v1 prints compose's escape, v2 the plain text
        env = {**service["environment"], "PATH": f"{tmp_path}:/usr/bin:/bin", "CALLS": str(calls)}
        calls.unlink(missing_ok=True)
        done = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
        return done.returncode, calls.read_text().splitlines() if calls.exists() else []

    endpoint = "--endpoint-url http://s3:8333"
    created = [f"{endpoint} s3api head-bucket --bucket farm-renders", f"{endpoint} s3 mb s3://farm-renders"]
    assert init("s3://farm-renders/jobs/2026") == (0, created)
    assert init("s3://farm-renders") == (0, created)
    # Renders written inside the containers would be lost: refused before anything else starts.
    assert init("/srv/renders") == (1, [])


def test_no_secret_is_written_in_the_compose_file() -> None:
    """Every credential is a required variable with no default, so it can only come from the env file."""
    text = COMPOSE_FILE.read_text()
    raw = yaml.safe_load(text)
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", value), (name, key, value)
    assert not re.search(r"://[^/\s@:]+:[^/\s@]+@", text), "a URL with a password in it"


def test_the_env_example_names_every_required_variable_and_no_secret() -> None:
    """Compose refuses to start until the user has chosen the secrets; the example never chooses them."""
    settings = re.sub(r"^\s*#.*$", "", COMPOSE_FILE.read_text(), flags=re.MULTILINE)
    required = set(re.findall(r"\$\{(\w+):\?", settings))
    example = _example_variables()
    assert required and required <= set(example)
    assert {name for name in required if example[name]} == set()
    refused = _config(COMPOSE_FILE, ENV_EXAMPLE)
    assert refused.returncode != 0
    assert "set it in the env file" in refused.stderr and any(name in refused.stderr for name in required)


def test_api_waits_for_a_successful_migration(services: dict[str, Any]) -> None:
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_a_typo_is_rejected(env_file: Path, tmp_path: Path) -> None:
    text = COMPOSE_FILE.read_text()
    assert "\n    image: redis:7\n" in text
    # The untouched copy must pass from tmp_path too, so the typo is the only reason for a rejection.
    (tmp_path / "good.yaml").write_text(text)
    good = _config(tmp_path / "good.yaml", env_file)
    assert good.returncode == 0, good.stderr
    (tmp_path / "bad.yaml").write_text(text.replace("\n    image: redis:7\n", "\n    imagex: redis:7\n", 1))
    bad = _config(tmp_path / "bad.yaml", env_file)
    assert bad.returncode != 0
    assert "imagex" in bad.stderr


def test_operators_get_rotated_logs_healthchecks_and_optional_monitoring(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert service["logging"]["driver"] == "json-file" and service["logging"]["options"]["max-size"], name
    for name in ["api", *WORKERS]:
        assert services[name]["healthcheck"]["test"], name
    for name in ("flower", "prometheus"):
        assert services[name]["profiles"] == ["monitoring"]
    scrape = yaml.safe_load((DOCKER_DIR / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics" and scrape["static_configs"][0]["targets"] == ["api:8000"]


def test_redis_requires_the_password_every_process_is_given(services: dict[str, Any]) -> None:
    from shared.config import Settings

    assert "--requirepass" in " ".join(services["redis"]["command"])
    env = services["api"]["environment"]
    assert env["ARCHFARM_BROKER_PASSWORD"] == services["redis"]["environment"]["REDIS_PASSWORD"]
    settings = Settings(broker_url=env["ARCHFARM_BROKER_URL"], broker_password="p@ss/word")
    assert settings.broker_url == "redis://:p%40ss%2Fword@redis:6379/0"
