"""Kubernetes manifests for a farm (`archfarm kube`): the API, one worker Deployment per pool that KEDA scales
on the pool's backlog in GPU-seconds, and Prometheus (and optionally Flower) beside them.

Choices, each for a reason:
- Workers are Deployments, not ScaledJobs: a worker keeps its model stack loaded and compiled for hours; a Job
  per message would load and compile it for every task. KEDA scales each Deployment through an HPA on
  `max(archfarm_backlog_seconds{pool=...})` (max: every API replica exports the same figure), one worker per
  `target` GPU-seconds of work queued or running, down to `min_workers` (0: the pool scales to zero once its
  backlog has been empty for the cool-down).
- Scale-down never kills a task. A pod's SIGTERM is the worker's warm shutdown: it takes no new message
  (prefetch is disabled, so it holds none beside the one it renders), finishes the call it is in, and its
  launcher hands back whatever else it had claimed, at once. The pod's grace period is the longest time
  limit of a task of the pool's profile plus a margin, so the call always ends before the kubelet's SIGKILL
  (a call running into its time limit is stopped by Celery itself, and handed back, not lost).
- Secrets are never written here: every pod reads the `archfarm` Secret (database and broker URLs, S3 keys,
  notification key), created by the operator; the ConfigMap holds the rest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from shared.config import DEFAULT_POOL, Settings
from shared.limits import task_time_limit
from shared.spec import Profile

GRACE_MARGIN_S = 60
"""Beyond a task's time limit: Celery stopping the call, the launcher handing back what was claimed."""
API_PORT = 8000
SECRET = "archfarm"
"""The Secret every pod reads its credentials from (ARCHFARM_DATABASE_URL, ARCHFARM_BROKER_URL, AWS_*)."""
PROMETHEUS = "http://archfarm-prometheus:9090"
KUBE_NAME = r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?"
"""A pool name that is a valid part of its workers' object names and labels (DNS-1123, 63 characters)."""

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Pool:
    """A pool's workers: what they render and how far they scale."""

    name: str
    profile: Profile
    """The pool's heaviest profile: its tasks' time limit sizes the pods' grace period."""
    min_workers: int = 0
    max_workers: int = 8
    target: int = 1800
    """GPU-seconds of backlog per worker: at 1800, a backlog of two hours' work runs on four GPUs."""

    def __post_init__(self) -> None:
        if not re.fullmatch(KUBE_NAME, self.name):
            raise ValueError(
                f"pool {self.name!r}: on Kubernetes, lowercase letters, digits and inner '-' (at most 40), as its "
                "workers' object names must be"
            )
        if not 0 <= self.min_workers <= self.max_workers or self.max_workers < 1 or self.target < 1:
            raise ValueError(f"pool {self.name!r}: needs 0 ≤ min ≤ max, max ≥ 1 and a positive target")

    @property
    def workload(self) -> str:
        return f"archfarm-worker-{self.name}"

    def grace_s(self, settings: Settings) -> int:
        return task_time_limit(self.profile, settings) + GRACE_MARGIN_S


def manifests(
    pools: list[Pool], settings: Settings, image: str, worker_image: str, flower: bool = False
) -> list[Manifest]:
    """Every object of the farm, in the order `kubectl apply` wants them."""
    found = [_config(settings), *_api(image), *_prometheus()]
    for pool in pools:
        found += [_worker(pool, settings, worker_image), _scaler(pool)]
    return found + (_flower() if flower else [])


HEADER = """\
# Kubernetes manifests of an archfarm farm, printed by `archfarm kube` (regenerate rather than edit).
# Needs KEDA (keda.sh) and the NVIDIA device plugin; create the `archfarm` Secret (ARCHFARM_DATABASE_URL,
# ARCHFARM_BROKER_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ARCHFARM_S3_ENDPOINT_URL) and the
# `archfarm-prometheus-token` Secret (key `token`: `archfarm token create prometheus`) first.
"""


def dump(objects: list[Manifest]) -> str:
    return HEADER + yaml.safe_dump_all(objects, sort_keys=False)


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "archfarm", "app.kubernetes.io/component": component}


def _meta(name: str, component: str) -> dict[str, Any]:
    return {"name": name, "labels": _labels(component)}


def _env() -> list[dict[str, Any]]:
    return [{"configMapRef": {"name": "archfarm"}}, {"secretRef": {"name": SECRET}}]


def _config(settings: Settings) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta("archfarm", "config"),
        "data": {
            "ARCHFARM_QUEUE": settings.queue,
            "ARCHFARM_STORAGE_URL": "s3://archfarm/renders",
            "ARCHFARM_MODELS_DIR": "/models",
            "ARCHFARM_LOG_FORMAT": "json",
            "ARCHFARM_HEARTBEAT_TIMEOUT": str(int(settings.heartbeat_timeout)),
        },
    }


def _deployment(name: str, component: str, pod: dict[str, Any], replicas: int | None) -> Manifest:
    spec: dict[str, Any] = {
        "selector": {"matchLabels": {**_labels(component), "app.kubernetes.io/instance": name}},
        "template": {"metadata": {"labels": {**_labels(component), "app.kubernetes.io/instance": name}}, "spec": pod},
    }
    if replicas is not None:
        spec = {"replicas": replicas, **spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, component), "spec": spec}


def _service(name: str, component: str, port: int) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, component),
        "spec": {
            "selector": {**_labels(component), "app.kubernetes.io/instance": name},
            "ports": [{"name": "http", "port": port, "targetPort": port}],
        },
    }


def _api(image: str) -> list[Manifest]:
    def probe(path: str, period_s: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": API_PORT}, "periodSeconds": period_s}

    container = {
        "name": "api",
        "image": image,
        "args": ["api", "--host", "0.0.0.0", "--port", str(API_PORT)],
        "envFrom": _env(),
        "ports": [{"name": "http", "containerPort": API_PORT}],
        "livenessProbe": probe("/healthz", 30),
        "readinessProbe": probe("/readyz", 10),
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
    }
    migrate = {"name": "migrate", "image": image, "args": ["db", "upgrade"], "envFrom": _env()}
    pod = {"initContainers": [migrate], "containers": [container]}
    # One replica: its init container upgrades the schema, which two at once must not do.
    return [_deployment("archfarm-api", "api", pod, 1), _service("archfarm-api", "api", API_PORT)]


def _worker(pool: Pool, settings: Settings, image: str) -> Manifest:
    container = {
        "name": "worker",
        "image": image,
        # Only the pod's GPU is visible, always as cuda:0.
        "args": ["--devices", "cuda:0", "--pool", pool.name],
        "envFrom": _env(),
        "resources": {
            "requests": {"cpu": "4", "memory": "32Gi"},
            "limits": {"nvidia.com/gpu": "1", "memory": "64Gi"},
        },
        "volumeMounts": [{"name": "models", "mountPath": "/models"}],
    }
    pod = {
        "terminationGracePeriodSeconds": pool.grace_s(settings),
        "containers": [container],
        "volumes": [{"name": "models", "emptyDir": {}}],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    return _deployment(pool.workload, "worker", pod, None)  # KEDA sets the replicas: a re-apply keeps them


def _scaler(pool: Pool) -> Manifest:
    """The KEDA object: one worker per `target` GPU-seconds of the pool's backlog."""
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _meta(pool.workload, "worker"),
        "spec": {
            "scaleTargetRef": {"name": pool.workload},
            "minReplicaCount": pool.min_workers,
            "maxReplicaCount": pool.max_workers,
            "pollingInterval": 15,
            "cooldownPeriod": 600,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        # One worker less per two minutes, once the backlog has stayed low for five: a dip
                        # between two jobs does not unload models a minute before they are wanted again.
                        "scaleDown": {
                            "stabilizationWindowSeconds": 300,
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
                        }
                    }
                }
            },
            "triggers": [
                {
                    "type": "prometheus",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": PROMETHEUS,
                        "query": f'max(archfarm_backlog_seconds{{pool="{pool.name}"}})',
                        "threshold": str(pool.target),
                        "activationThreshold": "0",
                    },
                }
            ],
        },
    }


def _prometheus() -> list[Manifest]:
    """Prometheus scraping the API's /metrics (with a token: the API wants one beyond loopback)."""
    config = {
        "global": {"scrape_interval": "15s"},
        "scrape_configs": [
            {
                "job_name": "archfarm",
                "metrics_path": "/metrics",
                "authorization": {"credentials_file": "/etc/prometheus/token/token"},
                "static_configs": [{"targets": [f"archfarm-api:{API_PORT}"]}],
            }
        ],
    }
    container = {
        "name": "prometheus",
        "image": "prom/prometheus:v2.53.0",
        "args": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.retention.time=15d"],
        "ports": [{"name": "http", "containerPort": 9090}],
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/prometheus/prometheus.yml", "subPath": "prometheus.yml"},
            {"name": "token", "mountPath": "/etc/prometheus/token", "readOnly": True},
        ],
    }
    pod = {
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": "archfarm-prometheus"}},
            # `archfarm token create prometheus`, stored as the Secret's `token` key.
            {"name": "token", "secret": {"secretName": "archfarm-prometheus-token"}},
        ],
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta("archfarm-prometheus", "prometheus"),
            "data": {"prometheus.yml": yaml.safe_dump(config, sort_keys=False)},
        },
        _deployment("archfarm-prometheus", "prometheus", pod, 1),
        _service("archfarm-prometheus", "prometheus", 9090),
    ]


def _flower() -> list[Manifest]:
    container = {
        "name": "flower",
        "image": "mher/flower:2.0",
        "command": ["sh", "-c", 'exec celery --broker="$ARCHFARM_BROKER_URL" flower --port=5555'],
        "envFrom": [{"secretRef": {"name": SECRET}}],
        "ports": [{"name": "http", "containerPort": 5555}],
    }
    return [
        _deployment("archfarm-flower", "flower", {"containers": [container]}, 1),
        _service("archfarm-flower", "flower", 5555),
    ]


def parse_pool(text: str, default_profile: str) -> tuple[str, str]:
    """`NAME` or `NAME=PROFILE` (`--pool sdxl=sdxl-archviz`): the pool and the profile that sizes it."""
    name, _, profile = text.partition("=")
    return (name or DEFAULT_POOL), (profile or default_profile)
