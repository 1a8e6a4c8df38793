"""An upscale's assembly task: its image's tiles read from storage one at a time, blended (`workers.assembly`)
and written once, with a thumbnail and a sidecar naming the image enlarged and every tile."""

from __future__ import annotations

import hashlib
import mimetypes
import time
from typing import Any

import cv2
import numpy as np
from PIL import Image

from shared.errors import PermanentError, PlanError
from shared.images import decode_image
from shared.sidecar import Models, PlanRecord, Sidecar, SourceRecord
from shared.storage import Storages
from shared.thumbnails import CONTENT_TYPE, thumbnail, thumbnail_key
from workers.assembly import assemble
from workers.renderer import Work


def assemble_image(storages: Storages, task: Work, tiles: list[tuple[int, int, str]]) -> dict[str, Any]:
    """Assemble, store and describe the image of an assembly task from its `tiles` ((index, artifact id, URL)
    of each); the artifact row to record for it. A tile missing from the database or from storage fails the
    task for good: `retry` of the job renders it again."""
    upscale, started, key, seed = task.upscale, time.perf_counter(), task.outputs[0], task.seeds[0]
    assert upscale is not None  # an assembly belongs to an upscale
    grid = upscale.grid()
    if [index for index, _, _ in tiles] != list(range(grid.count)):
        raise PermanentError(f"{key}: {grid.count - len(tiles)} of its {grid.count} tiles are not rendered")

    def read(index: int) -> np.ndarray:
        """A tile as BGR (a view of the decoded RGB: no copy)."""
        _, artifact, url = tiles[index]
        try:
            image = decode_image(storages.read(url), url, max_pixels=storages.settings.max_image_pixels)
        except (FileNotFoundError, PlanError) as error:
            raise PermanentError(f"tile {index} of {key} (artifact {artifact}): {error or 'gone'}") from None
        return np.asarray(image)[:, :, ::-1]

    result = assemble(grid, read, upscale.format)
    assembled_s = time.perf_counter() - started
    storage = storages.open(task.output_url)
    side_key = key.rsplit(".", 1)[0] + ".json"
    meta = Sidecar(
        job={"id": task.job_id, "name": task.job_name},
        task=task.task_id,
        key=key,
        batch_seeds=[seed],
        plan=PlanRecord(name=task.plan_name, url=task.plan_url, sha256=task.plan_digest),
        stage="upscale",
        source=SourceRecord(
            artifact=upscale.parent, url=upscale.image, sha256=upscale.image_sha256 or "", strength=upscale.strength
        ),
        upscale=upscale.model_dump(mode="json"),
        tiles=[{"index": index, "artifact": artifact, "url": url} for index, artifact, url in tiles],
        seam=result.seam,
        style=task.style.model_dump(),
        seed=seed,
        profile=task.profile.model_dump(mode="json"),
        models=Models(),
        image_sha256=hashlib.sha256(result.data).hexdigest(),
        timings={"assemble_s": assembled_s},
    )
    storage.put(key, result.data, mimetypes.guess_type(key)[0] or "application/octet-stream")
    preview = Image.fromarray(cv2.cvtColor(result.preview, cv2.COLOR_BGR2RGB))
    storage.put(thumbnail_key(key), thumbnail(preview), CONTENT_TYPE)
    storage.put(side_key, meta.model_dump_json(indent=2, exclude_none=True).encode(), "application/json")
    return {
        "job_id": task.job_id,
        "task_id": task.task_id,
        "stage": "upscale",
        "parent_id": upscale.parent,
        "plan_digest": task.plan_digest,
        "style": task.style.name,
        "seed": seed,
        "seam": result.seam,
        "url": storage.url(key),
        "sidecar_url": storage.url(side_key),
        "width": grid.width,
        "height": grid.height,
        "size_bytes": len(result.data),
    }
