"""Settings: one typed object read from `ARCHFARM_*` environment variables.

Infrastructure is chosen by URL, so the same code runs embedded (SQLite, local folder, in-process) and
distributed (PostgreSQL, S3, Redis) without edits.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.licences import Use
from shared.notify import check_url


def _default_models_dir() -> Path:
    return Path.home() / ".cache" / "archfarm" / "models"


class Settings(BaseSettings):
    """Every knob archfarm reads from the environment, with its default."""

    model_config = SettingsConfigDict(env_prefix="ARCHFARM_", extra="ignore")

    database_url: str = Field(
        "sqlite:///archfarm.db",
        description="SQLAlchemy URL: `sqlite:///FILE` (default, in the working folder) or `postgresql+psycopg://...`.",
    )
    storage_url: str = Field(
        "renders",
        description="Where results go when a job names no `output`: a folder, `file:///abs/path` or `s3://bucket/prefix`.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint for non-AWS servers (MinIO, R2, Ceph, SeaweedFS); unset means AWS."
    )
    s3_public_endpoint_url: str | None = Field(
        None,
        description="S3 endpoint that pre-signed download links name, where clients reach S3 at another address "
        "than the farm does (a published port, a proxy); unset means s3_endpoint_url.",
    )
    s3_region: str | None = Field(None, description="S3 region; credentials come from the usual AWS variables.")
    models_dir: Path = Field(
        default_factory=_default_models_dir,
        description="Model cache folder: tiny presets are built here once and loaded back with from_pretrained; "
        "models named by URL are fetched here once per version.",
    )
    broker_url: str | None = Field(None, description="Celery broker (`redis://...`); unset runs tasks in-process.")
    broker_password: str | None = Field(
        None,
        description="The broker's password, put into ARCHFARM_BROKER_URL when that names none: the URL can then be "
        "shared and logged, the secret kept apart (an env file, a secret store).",
    )
    max_image_pixels: int = Field(
        80_000_000, description="Largest plan image (width × height) decoded; larger ones are refused as bombs."
    )
    max_plan_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        le=512 * 1024 * 1024,
        description="Largest plan or control image file (bytes) that submit reads; larger ones are refused by "
        "their size, before anything is decoded. Also the most a REST API upload may carry.",
    )
    queue: str = Field("archfarm", description="Celery queue that jobs are sent to and workers consume by default.")
    heartbeat_interval: float = Field(10.0, gt=0, description="Seconds between a worker's heartbeats.")
    warm: list[str] = Field(
        default_factory=list,
        description="Profiles (built-in names or YAML files) whose every batch bucket a worker's pool process compiles "
        "before it takes a task (`archfarm worker --warm`), as a JSON list.",
    )
    device_memory_gb: float | None = Field(
        None,
        gt=0,
        description="GiB a worker's device offers model stacks (default: the GPU's memory; on a CPU, the machine's "
        "RAM): a worker never claims a task whose stack is larger, and hands it to one that can hold it.",
    )
    warm_timeout: float = Field(
        1800.0, gt=0, description="Seconds a pool process may take to warm before its worker gives up on it."
    )
    heartbeat_timeout: float = Field(
        60.0, gt=0, description="A worker silent this long is dead: its running tasks are requeued and re-sent."
    )
    stranded_after: float = Field(
        120.0,
        gt=0,
        description="A queued task whose message was due this long ago, while a worker on its queue sat idle as "
        "long, has lost its message (broker restart, interrupted submit, dead worker): it is sent again.",
    )
    shares: dict[str, float] = Field(
        default_factory=dict,
        description='Fair-share weights of owners (token names; `""` for jobs from the CLI or Python) within a '
        'pool, as JSON (`{"alice": 2, "bob": 1}`); an owner not named weighs 1.',
    )
    share_window: float = Field(
        3600.0,
        gt=0,
        description="Seconds of past work that fair share weighs: each owner's GPU-seconds finished this recently, "
        "plus its work in flight, over its weight, decides who is served next.",
    )
    quotas: dict[str, float] = Field(
        default_factory=dict,
        description='GPU-seconds an owner may use per 24 hours, as JSON (`{"bob": 36000}`): its jobs are refused '
        "once the quota is spent, and their tasks past it wait until usage of the last 24 hours falls below it.",
    )
    transient_budget: float = Field(
        900.0,
        gt=0,
        description="Seconds a task keeps retrying transient errors (storage, database, broker away) before it "
        "fails: outages shorter than this are ridden out.",
    )
    error_nodes: int = Field(3, ge=1, description="A task fails once errors it raised came from this many nodes.")
    error_attempts: int = Field(5, ge=1, description="A task fails once it has raised errors this many times.")
    crash_nodes: int = Field(
        3, ge=1, description="A task fails once the process running it has died on this many nodes."
    )
    crash_attempts: int = Field(
        5, ge=1, description="A task fails once the process running it has died this many times."
    )
    blocklist_after: int = Field(
        3,
        ge=0,
        description="A node that failed this many tasks of a job whose plans other nodes render takes no more of "
        "them; 0: no blocklist.",
    )
    visibility_timeout: int = Field(
        6 * 3600,
        gt=0,
        description="Redis visibility timeout (s); must exceed the longest task, so submit refuses longer ones.",
    )
    seconds_per_step: float = Field(
        2.0,
        gt=0,
        description="Pessimistic seconds per denoising step at 512² with one ControlNet: sizes task time limits.",
    )
    controlnet_cache_bytes: int | None = Field(
        None, gt=0, description="ControlNets kept on the device (bytes); least recently used ones move to CPU memory."
    )
    offload_cache_bytes: int | None = Field(
        None, ge=0, description="ControlNets kept in CPU memory after eviction (bytes) before they are dropped."
    )
    device: str = Field("auto", description="Torch device for in-process rendering: `auto`, `cpu`, `cuda`, `cuda:N`.")

    log_format: Literal["text", "json"] = Field(
        "text", description="Worker logs: `text` lines, or `json`, one object per line with job and task ids."
    )
    api_auth: Literal["auto", "on", "off"] = Field(
        "auto",
        description="REST API tokens: `auto` requires one when the API listens beyond loopback, `on` always, "
        "`off` never (a token given is still checked and names the job's owner).",
    )
    api_model_roots: list[Path] = Field(
        default_factory=list,
        description="Folders under which the REST API accepts local model references (a shared model store), "
        'as JSON (`["/models"]`); empty: presets and hub ids only.',
    )
    api_storage_prefixes: list[str] = Field(
        default_factory=list,
        description="s3:// prefixes that the REST API's plans, control images and outputs must lie under, as JSON; "
        "empty: the bucket of ARCHFARM_STORAGE_URL.",
    )
    api_notify_prefixes: list[str] = Field(
        default_factory=list,
        description="URL prefixes that the REST API's job `notify` URLs must lie under, as JSON "
        '(`["https://hooks.example/"]`); empty: a job from the API cannot name its own (the farm\'s '
        "ARCHFARM_NOTIFY_URLS still apply).",
    )
    use: Use = Field(
        "commercial",
        description="What jobs that do not say are for: `commercial` refuses models whose licence forbids "
        "commercial use (FLUX.1 [dev]); taken into each job at submit.",
    )
    notify_urls: list[str] = Field(
        default_factory=list,
        description='Where jobs whose spec has no `notify` report, as JSON (`["https://hooks.example/farm"]`): '
        "taken into each job at submit, so changing it later leaves stored jobs as they were.",
    )
    notify_secret: SecretStr | None = Field(
        None,
        description="Key of the HMAC-SHA256 signature on every notification (X-Archfarm-Signature); needed where "
        "notifications are sent (workers; this process for `render`). Unset: sent unsigned.",
    )
    public_url: str | None = Field(
        None,
        description="Where people reach this farm's dashboard (`archfarm api`): notifications link a job's contact "
        "sheet, `{public_url}/ui/jobs/{id}`.",
    )
    notify_timeout: float = Field(
        10.0, gt=0, description="Seconds a notification may take to connect, to send and to be answered, each."
    )
    notify_attempts: int = Field(8, ge=1, le=100, description="Attempts at a notification before it is given up.")
    notify_backoff: float = Field(
        5.0,
        gt=0,
        description="Seconds before a failed notification's first retry; each later wait is six times longer, at "
        "most two hours (5 s, 30 s, 3 min, 18 min, 1.8 h, 2 h, 2 h: 8 attempts over 6.5 hours).",
    )

    @field_validator("shares", "quotas")
    @classmethod
    def _positive(cls, weights: dict[str, float]) -> dict[str, float]:
        bad = [owner for owner, weight in weights.items() if not weight > 0]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: a weight or quota must be a positive number")
        return weights

    def share_of(self, owner: str | None) -> float:
        """An owner's fair-share weight."""
        return self.shares.get(owner or "", 1.0)

    @field_validator("notify_urls")
    @classmethod
    def _check_urls(cls, urls: list[str]) -> list[str]:
        return [check_url(url) for url in urls]

    @field_validator("notify_secret", "public_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """An empty variable is an unset one (`ARCHFARM_PUBLIC_URL=`)."""
        return None if value == "" else value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, url: str | None) -> str | None:
        return None if url is None else check_url(url).rstrip("/")

    @model_validator(mode="after")
    def _broker_password(self) -> Settings:
        if self.broker_url and self.broker_password:
            parts = urlsplit(self.broker_url)
            if parts.password is None:
                netloc = f"{parts.username or ''}:{quote(self.broker_password, safe='')}@{parts.netloc}"
                self.broker_url = urlunsplit(parts._replace(netloc=netloc))
        return self

    def queue_for(self, pool: str | None) -> str:
        """The broker queue of a pool (`archfarm worker --pool NAME`, a job's `pool:`); the default pool's, named
        `default` or not named at all, is `queue` itself."""
        return self.queue if pool in (None, DEFAULT_POOL) else f"{self.queue}.{pool}"

    def pool_of(self, queue: str) -> str:
        """The pool whose queue `queue` is (`queue_for` undone); a queue named otherwise is its own name."""
        return DEFAULT_POOL if queue == self.queue else queue.removeprefix(f"{self.queue}.")


DEFAULT_POOL = "default"
"""The pool of jobs that name none, and of workers started without `--pool`."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once; tests build `Settings(...)` directly instead."""
    return Settings()
