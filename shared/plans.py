"""Reading and checking plan images at submit time, so a bad plan stops the job before anything is stored."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

from shared.errors import InvalidInput, PlanError, StorageError
from shared.images import content_hash, decode_image
from shared.storage import Storage, Storages, canonical_url


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated plan: where workers read it, a path-safe name for output keys, and its content hash."""

    url: str
    name: str
    digest: str


def output_key(plan: Plan, style: str, style_digest: str, seed: int, profile_digest: str) -> str:
    """`PLAN/STYLE/seed-SEED_DIGEST.png`: readable, and unique to every input that changes the image."""
    digest = hashlib.sha256(f"{plan.digest}:{style_digest}:{seed}:{profile_digest}".encode()).hexdigest()[:12]
    return f"{plan.name}/{style}/seed-{seed}_{digest}.png"


def safe_name(url: str) -> str:
    """The file stem of a plan's URL, made safe (`safe_stem`)."""
    return safe_stem(PurePosixPath(unquote(urlparse(url).path)).stem)


def safe_stem(stem: str) -> str:
    """A name reduced to a path-safe alphabet: names become key segments, never path tricks."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip(".-")[:64]
    return cleaned or "plan"


def load_plan(plan: str, storages: Storages) -> tuple[Plan, bytes]:
    """Read and fully decode one plan (at most ARCHFARM_MAX_PLAN_BYTES of it); any problem is a `PlanError`
    naming it."""
    settings = storages.settings
    try:
        url = canonical_url(plan)
        data = storages.read(url, max_bytes=settings.max_plan_bytes)
    except FileNotFoundError:
        raise PlanError(plan, "no such file") from None
    except PermissionError:
        raise PlanError(plan, "permission denied") from None
    except (InvalidInput, StorageError) as e:
        raise PlanError(plan, str(e)) from None
    decode_image(data, plan, max_pixels=settings.max_image_pixels)
    return Plan(url=url, name=safe_name(url), digest=content_hash(data)), data


def load_plans(plans: Sequence[str], storages: Storages) -> list[Plan]:
    """Every plan of a job, checked; the same content given twice is refused (one artifact per plan)."""
    loaded: list[Plan] = []
    seen: dict[str, str] = {}
    for plan in plans:
        ref, _ = load_plan(plan, storages)
        if ref.digest in seen:
            raise InvalidInput(f"plans: {plan} has the same content as {seen[ref.digest]}")
        seen[ref.digest] = plan
        loaded.append(ref)
    return loaded


def stage_plans(plans: Sequence[Plan], storages: Storages) -> list[Plan]:
    """Copy local inputs (plans, control maps) into the farm's storage under `inputs/DIGEST.EXT`; s3:// ones
    are shared already."""
    staged = []
    storage = storages.open()
    for plan in plans:
        if plan.url.startswith("s3://"):
            staged.append(plan)
            continue
        data = storages.read(plan.url, max_bytes=storages.settings.max_plan_bytes)
        if content_hash(data) != plan.digest:
            raise PlanError(plan.url, "changed while the job was being submitted")
        url = store_input(data, PurePosixPath(urlparse(plan.url).path).suffix.lower(), storage)
        staged.append(Plan(url=url, name=plan.name, digest=plan.digest))
    return staged


def store_input(data: bytes, suffix: str, storage: Storage) -> str:
    """`data` in the farm's storage under `inputs/DIGEST.SUFFIX`, written once (content-addressed); its URL."""
    key = f"inputs/{content_hash(data)}{suffix}"
    if not storage.exists(key):
        storage.put(key, data, "application/octet-stream")
    return storage.url(key)
