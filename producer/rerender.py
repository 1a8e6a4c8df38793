"""Re-rendering an image from its sidecar: same plan bytes, models, settings, seed batch and scheduler.

On a CPU the result is bitwise identical (same threads, same call), also for images a farm rendered; on a GPU
it is as close as the kernels' determinism allows.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from pydantic import ValidationError

from producer.local import render_local
from shared.config import Settings
from shared.errors import ArchfarmError, InvalidInput, NotFound
from shared.plans import safe_name
from shared.sidecar import Models, Rerender, Sidecar
from shared.spec import JobSpec, Profile, Style, Upscale, describe, parse_model
from shared.storage import Storages
from workers.renderer import Renderer, Work


@dataclass(frozen=True)
class Rerendered:
    image: Path
    model_changes: list[str]
    """Models whose weights differ from the ones the sidecar recorded (the image may then differ too)."""
    shared_call: int
    """Other tasks the original shared its pipeline call with: the re-render (alone) matches it within 1/255,
    not bitwise, when there were any."""
    comparison: Rerender
    """How the image compares with the original, also written into its sidecar."""

    @property
    def verdict(self) -> str:
        """`identical to the original, bit for bit`, or by how much it differs."""
        found = self.comparison
        if found.identical:
            return "identical to the original, bit for bit"
        if found.max_difference is None or not found.pixels:
            return "differs from the original (another sha256; the original image is not beside its sidecar)"
        return (
            f"differs from the original by at most {found.max_difference}/255, in {found.pixels_differing} of "
            f"{found.pixels} pixels ({(found.pixels_differing or 0) / found.pixels:.2%})"
        )


def rerender(sidecar_path: Path, out_dir: Path, settings: Settings) -> Rerendered:
    """The image again, written to `out_dir` under its original key with its new sidecar, and nothing else.

    The task's seeds are rendered together as they were (a call's images depend on its batch), in a
    scratch folder with a throwaway database, on as many CPU threads as the original (`threads`); only the
    requested image is kept. The plan is re-read from where the job read it and named as it was, so the key
    comes out the same."""
    meta = _read(sidecar_path)
    with tempfile.TemporaryDirectory(prefix="archfarm-rerender-") as scratch:
        work = Path(scratch)
        # A scratch job: a database of its own, and nobody to tell about it.
        scratch_settings = settings.model_copy(
            update={"database_url": f"sqlite:///{work / 'rerender.db'}", "notify_urls": []}
        )
        with _threads(meta.threads):
            image = (_tile if meta.tile is not None else _job)(meta, sidecar_path, work / "out", scratch_settings)
        target = out_dir / meta.key
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(image, target)
        fresh = Sidecar.model_validate_json(image.with_suffix(".json").read_bytes())
    comparison = compare(target, sidecar_path, meta)
    # The scratch job and plan are gone: the new sidecar names the original's, and the image it describes.
    fresh = fresh.model_copy(update={"job": meta.job, "task": meta.task, "plan": meta.plan, "rerender": comparison})
    target.with_suffix(".json").write_text(fresh.model_dump_json(indent=2, exclude_none=True))
    return Rerendered(
        image=target,
        model_changes=_changed_models(meta.models, fresh.models),
        shared_call=meta.shared_call,
        comparison=comparison,
    )


def _job(meta: Sidecar, sidecar_path: Path, out: Path, settings: Settings) -> Path:
    """The image's task rendered again as a job of its own (plan re-read from where the job read it and named
    as it was, so the key comes out the same); where its image lies."""
    url = meta.plan.url
    plan = out.parent / "plans" / f"{meta.plan.name or safe_name(url)}{_suffix(url)}"
    plan.parent.mkdir()
    try:
        plan.write_bytes(Storages(settings).read(url))
    except FileNotFoundError:
        raise InvalidInput(f"{sidecar_path}: the plan {url} is gone") from None
    spec = parse_model(
        JobSpec,
        {
            "name": "rerender",
            "plans": [str(plan)],
            "styles": [meta.style],
            "seeds": meta.batch_seeds,
            "profile": meta.profile,
            "output": str(out),
            **({"revise": meta.revision} if meta.revision else {}),
        },
        str(sidecar_path),
    )
    report = render_local(spec, settings)
    image = out / meta.key
    if not report.ok or not image.exists():
        # The key is derived from the plan's content and every setting: a different key means changed inputs.
        problems = "; ".join(report.errors.values()) or "the plan or a control image changed since"
        raise InvalidInput(f"{sidecar_path}: cannot reproduce {meta.key}: {problems}")
    return image


def _tile(meta: Sidecar, sidecar_path: Path, out: Path, settings: Settings) -> Path:
    """One tile of an upscale rendered again alone, as its worker rendered it (the other tiles and the assembly
    are not: a 6K image's hundred tiles are not re-rendered to check one); where its image lies."""
    try:
        upscale = Upscale.model_validate(meta.upscale)
        work = Work(
            task_id=meta.task,
            job_id=str(meta.job.get("id", "")),
            job_name="rerender",
            output_url=out.as_uri(),
            plan_url=meta.plan.url,
            plan_name=meta.plan.name,
            plan_digest=meta.plan.sha256,
            style=Style.model_validate(meta.style),
            seeds=meta.batch_seeds,
            outputs=[meta.key],
            profile=Profile.model_validate(meta.profile),
            stage="tile",
            strength=upscale.strength,
            upscale=upscale,
            tile=meta.tile,
        )
    except ValidationError as e:
        raise InvalidInput(f"{sidecar_path}: not a tile's sidecar ({describe(e)})") from None
    renderer = Renderer(settings)
    try:
        prepared = renderer.prepare(work)
    except ArchfarmError as e:
        raise InvalidInput(f"{sidecar_path}: cannot reproduce {meta.key}: {e}") from None
    renderer.upload(work, renderer.render([prepared], None)[0])
    return out / meta.key


def compare(image: Path, sidecar_path: Path, meta: Sidecar) -> Rerender:
    """The re-rendered `image` against the original: identical when their PNGs' sha256 match; otherwise, where
    the original lies beside its sidecar, the largest difference of any channel and how many pixels differ
    (the same profile gives the same size)."""
    data = image.read_bytes()
    identical = hashlib.sha256(data).hexdigest() == meta.image_sha256
    found = Rerender(of=str(sidecar_path.resolve()), image=str(image.resolve()), identical=identical)
    original = sidecar_path.with_suffix(".png")
    if identical or not original.is_file():
        return found
    with Image.open(original) as before, Image.open(io.BytesIO(data)) as after:
        old, new = np.asarray(before.convert("RGB"), np.int16), np.asarray(after.convert("RGB"), np.int16)
    delta = np.abs(old - new).max(axis=2)
    return found.model_copy(
        update={
            "max_difference": int(delta.max()),
            "pixels_differing": int(np.count_nonzero(delta)),
            "pixels": int(delta.size),
        }
    )


@contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """Run on `count` CPU threads (the original's), then on as many as before."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _suffix(url: str) -> str:
    return PurePosixPath(urlparse(url).path).suffix.lower()


def _read(path: Path) -> Sidecar:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file") from None
    except OSError as e:
        raise InvalidInput(f"{path}: not a sidecar ({e})") from None
    try:
        return Sidecar.model_validate_json(data)
    except ValidationError as e:
        raise InvalidInput(f"{path}: not an archfarm sidecar ({describe(e)})") from None


def _changed_models(recorded: Models, fresh: Models) -> list[str]:
    pairs = [(recorded.base, fresh.base), *zip(recorded.controlnets, fresh.controlnets, strict=False)]
    return [old.name for old, new in pairs if old.sha256 != new.sha256]
