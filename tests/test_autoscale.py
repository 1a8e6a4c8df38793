"""Autoscaling: the Kubernetes manifests `archfarm kube` prints, validated offline against the Kubernetes
client's models, and their scaling rule played by a small controller that starts and stops real `archfarm
worker` processes from the API's `archfarm_backlog_seconds`, as KEDA's HPA would."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import kubernetes.client.models as k8s
import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from producer.api import create_app
from producer.cli import app as cli
from producer.client import Farm
from shared.config import Settings
from shared.db.costs import record_cost
from shared.db.models import Artifact, Job, Task
from shared.db.status import JobStatus
from shared.limits import task_time_limit
from shared.spec import Profile, load_profile
from tests.processes import WorkerProcess, live_workers, wait_for
from tests.test_api import sample
from tests.test_farm import FAST, job

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "docker" / "kubernetes" / "archfarm.yaml"
SHIPPED_ARGS = ["kube", "--pool", "default=sd15-archviz", "--pool", "sdxl=sdxl-archviz"]
MODELS = {("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment")}


def fits(data: Any, kind: str, path: str) -> None:
    """`data` is a valid `kind` of the Kubernetes client's models: no unknown field (kubeconform's -strict),
    every value of the model's type, required fields there."""
    if kind.startswith("List["):
        assert isinstance(data, list), path
        for i, item in enumerate(data):
            fits(item, kind[5:-1], f"{path}[{i}]")
    elif kind.startswith("Dict["):
        assert isinstance(data, dict), path
        for key, value in data.items():
            fits(value, kind[kind.index(",") + 1 : -1].strip(), f"{path}.{key}")
    elif kind in ("str", "int", "bool", "float"):
        assert type(data).__name__ == kind or (kind == "float" and isinstance(data, int)), f"{path}: {data!r}"
    elif kind != "object":  # IntOrString and the like
        model = getattr(k8s, kind)
        assert isinstance(data, dict), path
        known = {key: attr for attr, key in model.attribute_map.items()}
        assert not set(data) - set(known), f"{path}: unknown fields {set(data) - set(known)}"
        for key, value in data.items():
            fits(value, model.openapi_types[known[key]], f"{path}.{key}")


def shipped() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(SHIPPED.read_text()))


def test_the_shipped_manifests_are_what_archfarm_kube_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("ARCHFARM_QUEUE", "ARCHFARM_HEARTBEAT_TIMEOUT", "ARCHFARM_SECONDS_PER_STEP"):
        monkeypatch.delenv(key, raising=False)
    printed = CliRunner().invoke(cli, SHIPPED_ARGS)
    assert printed.exit_code == 0, printed.output
    assert printed.output == SHIPPED.read_text(), "regenerate: archfarm " + " ".join(SHIPPED_ARGS)
    refused = CliRunner().invoke(cli, ["kube", "--pool", "../x=sd15-archviz"])
    assert refused.exit_code != 0 and "pool '../x'" in refused.output


def test_the_manifests_are_valid_kubernetes_and_keda_objects() -> None:
    objects = shipped()
    for obj in objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in MODELS:
            model = f"V1{obj['kind']}"
            fits(obj, model, where)
            getattr(k8s, model).from_dict(obj)  # required fields and types, by the client's own validation
        else:
            assert (obj["apiVersion"], obj["kind"]) == ("keda.sh/v1alpha1", "ScaledObject"), where
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    scalers = [o for o in objects if o["kind"] == "ScaledObject"]
    assert {s["metadata"]["name"] for s in scalers} == {"archfarm-worker-default", "archfarm-worker-sdxl"}
    for scaler, profile in zip(scalers, ("sd15-archviz", "sdxl-archviz"), strict=True):
        spec = scaler["spec"]
        pod = deployments[spec["scaleTargetRef"]["name"]]["spec"]["template"]["spec"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        assert all(isinstance(value, str) for value in trigger["metadata"].values())  # KEDA wants strings
        assert trigger["metadata"]["query"].startswith("max(archfarm_backlog_seconds{pool=")
        assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"]  # scales to zero
        # A scale-down never kills a call: the pod's grace outlasts the longest task of its profile.
        assert pod["terminationGracePeriodSeconds"] > task_time_limit(load_profile(profile), Settings())
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert pod["containers"][0]["args"][-2:] == ["--pool", scaler["metadata"]["name"].split("-")[-1]]


TARGET = 40.0
"""GPU-seconds of backlog per worker in the simulation: two workers for the job's 60 GPU-seconds of history,
one once the workers' own measures have brought it under 40."""
MOST = 2


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.s3
@pytest.mark.slow
def test_a_controller_scaling_on_the_backlog_brings_it_to_zero_without_killing_a_task(
    farm: Farm, farm_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, example_plan: Path, tmp_path: Path
) -> None:
    """What KEDA does, played with real workers: every poll reads the pool's backlog from /metrics and wants
    ceil(backlog / target) workers (at most two); a worker more is started, one too many is stopped with
    SIGTERM (the pod's scale-down), which must let it finish its call and exit cleanly."""
    for key, value in farm_env.items():
        monkeypatch.setenv(key, value)
    job_id = farm.submit(job(example_plan, {**FAST, "steps": 2}, seeds=15))
    with farm.sessions.begin() as session:  # the farm's history: 2 GPU-s an image, 60 of backlog, two workers
        record_cost(session, Profile.model_validate(session.get_one(Job, job_id).spec["profile"]).digest(), "cpu", 2.0)
    running: list[WorkerProcess] = []
    stopped: list[WorkerProcess] = []
    wanted: list[int] = []
    left: list[int] = []  # the job's tasks not ended at each scale-down
    with TestClient(create_app(Settings())) as api:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            backlog = sample(api.get("/metrics").text, "archfarm_backlog_seconds", pool="default")
            wanted.append(min(MOST, math.ceil(backlog / TARGET)))
            if wanted[-1] > len(running):  # all the replicas wanted at once, as the HPA sets them
                while len(running) < wanted[-1]:
                    log = tmp_path / f"worker-{len(running) + len(stopped)}.log"
                    running.append(WorkerProcess(farm_env, "cpu:1", log))
                wait_for(lambda: live_workers(farm) >= len(running), 120, "the workers to start")
            elif wanted[-1] < len(running) and wanted[-3:] == [wanted[-1]] * 3:  # settled, as the HPA's window
                worker = running.pop()
                worker.terminate()
                stopped.append(worker)
                left.append(farm.status(job_id).total - farm.status(job_id).done)
            if not running and backlog == 0:
                break
            time.sleep(0.5)
    for worker in stopped:
        worker.proc.wait(120)  # a clean exit within the grace, never killed
        assert worker.proc.returncode == 0, worker.log.read_text()[-2000:]
    view = farm.status(job_id)
    assert view.status is JobStatus.SUCCEEDED and not running, wanted
    print(f"\nworkers wanted at each poll: {wanted}; tasks left at each scale-down: {left}")
    assert max(wanted) == MOST and len(stopped) == MOST  # scaled out, then in to zero
    assert left[0] > 0  # the first scale-down came while the job had work left
    with farm.sessions() as session:
        attempts = session.scalars(select(Task.attempts).where(Task.job_id == job_id)).all()
        images = session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id))
    assert attempts == [1] * 30 and images == 30  # no task interrupted, handed back or rendered twice
