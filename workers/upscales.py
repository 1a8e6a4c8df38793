"""An upscale's assembly task: its image's tiles read from storage one at a time, blended (`workers.assembly`)
and written once, with a thumbnail and a sidecar naming the image enlarged and every tile."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import cv2
from PIL import Image

from shared.errors import PermanentError
from shared.sidecar import Models, PlanRecord, Sidecar, SourceRecord
from shared.spec import Profile, Style, Upscale
from shared.storage import Storages
from shared.thumbnails import CONTENT_TYPE, thumbnail, thumbnail_key
from workers.assembly import CONTENT_TYPES, assemble, decode_tile


@dataclass(frozen=True)
class Assembly:
    """An assembly task's inputs, copied out of the database."""

    task_id: str
    job_id: str
    job_name: str
    output_url: str
    key: str
    seed: int
    plan_url: str
    plan_name: str
    plan_digest: str
    style: Style
    profile: Profile
    upscale: Upscale
    tiles: list[tuple[int, int, str]]
    """(index, artifact id, URL) of each tile."""


def assemble_image(storages: Storages, task: Assembly) -> dict[str, Any]:
    """Assemble, store and describe the image; the artifact row to record for it. A tile missing from the
    database or from storage fails the task for good: `retry` of the job renders it again."""
    upscale, started = task.upscale, time.perf_counter()
    grid = upscale.grid()
    if [index for index, _, _ in task.tiles] != list(range(grid.count)):
        raise PermanentError(f"{task.key}: {grid.count - len(task.tiles)} of its {grid.count} tiles are not rendered")

    def read(index: int) -> Any:
        _, artifact, url = task.tiles[index]
        try:
            data = storages.read(url)
        except FileNotFoundError:
            raise PermanentError(f"tile {index} of {task.key} (artifact {artifact}) is gone from {url}") from None
        return decode_tile(data, f"tile {index} of {task.key} ({url})")

    result = assemble(grid, read, upscale.format)
    assembled_s = time.perf_counter() - started
    storage = storages.open(task.output_url)
    side_key = task.key.rsplit(".", 1)[0] + ".json"
    meta = Sidecar(
        job={"id": task.job_id, "name": task.job_name},
        task=task.task_id,
        key=task.key,
        batch_seeds=[task.seed],
        plan=PlanRecord(name=task.plan_name, url=task.plan_url, sha256=task.plan_digest),
        stage="upscale",
        source=SourceRecord(
            artifact=upscale.parent, url=upscale.image, sha256=upscale.image_sha256 or "", strength=upscale.strength
        ),
        upscale=upscale.model_dump(mode="json"),
        tiles=[{"index": index, "artifact": artifact, "url": url} for index, artifact, url in task.tiles],
        seam=result.seam,
        style=task.style.model_dump(),
        seed=task.seed,
        profile=task.profile.model_dump(mode="json"),
        models=Models(),
        image_sha256=hashlib.sha256(result.data).hexdigest(),
        timings={"assemble_s": assembled_s},
    )
    storage.put(task.key, result.data, CONTENT_TYPES[upscale.format])
    preview = Image.fromarray(cv2.cvtColor(result.preview, cv2.COLOR_BGR2RGB))
    storage.put(thumbnail_key(task.key), thumbnail(preview), CONTENT_TYPE)
    storage.put(side_key, meta.model_dump_json(indent=2, exclude_none=True).encode(), "application/json")
    return {
        "job_id": task.job_id,
        "task_id": task.task_id,
        "stage": "upscale",
        "parent_id": upscale.parent,
        "plan_digest": task.plan_digest,
        "style": task.style.name,
        "seed": task.seed,
        "seam": result.seam,
        "url": storage.url(task.key),
        "sidecar_url": storage.url(side_key),
        "width": grid.width,
        "height": grid.height,
        "size_bytes": len(result.data),
    }
