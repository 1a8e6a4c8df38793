"""What a claimed task is turned into: control maps, a render, PNGs and sidecars in storage.

No database and no policy here: the lifecycle claims, hands a `Work` over, and settles whatever this raises.
One `Renderer` per worker process holds the model cache, the control-map cache and storage clients across
tasks, so models stay resident.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from shared import published
from shared.config import Settings
from shared.errors import InputError, InvalidInput, PermanentError
from shared.folders import built_once
from shared.images import content_hash, decode_image
from shared.licences import declared, licence_of
from shared.loras import MAX_LORA_BYTES
from shared.registry import UNION_MODES, default_controlnet, ip_adapter, is_path, is_url
from shared.revision import region
from shared.sidecar import Models, PlanRecord, Sidecar, SourceRecord
from shared.spec import Profile, Revise, Stage, Style, TileControl, Upscale
from shared.storage import Storage, Storages, input_errors
from shared.thumbnails import CONTENT_TYPE, thumbnail, thumbnail_key
from workers.adherence import adherence
from workers.engine.batching import BatchSizer
from workers.engine.compile import CompileOptions
from workers.engine.compile_cache import CompileKey, FleetCompileCache, Warmth
from workers.engine.footprint import stack_bytes
from workers.engine.loras import LORA_FILE, Lora
from workers.engine.models import ModelCache, default_dtype, device_memory, family_dtype, pick_device
from workers.engine.moodboards import Board, IPAdapter
from workers.engine.pipeline import Item, RenderResult, Request, Unit, compiled_shape, render_batch
from workers.look import look
from workers.preprocessors import ControlMaps
from workers.revision import composite, weights

log = logging.getLogger(__name__)

StepFn = Callable[[int, int], None]
"""Called as (step, total_steps) while a task renders; may raise to stop the render."""


@dataclass(frozen=True)
class Work:
    """What a claimed task needs, copied out of the database so no session is held while rendering."""

    task_id: str
    job_id: str
    job_name: str
    output_url: str
    plan_url: str
    plan_name: str
    """The plan's name in output keys (its file's stem): a farm reads its plans from content-addressed copies."""
    plan_digest: str
    style: Style
    seeds: list[int]
    outputs: list[str]
    profile: Profile
    """The profile of the task's pass (a staged job's draft or final profile)."""
    stage: Stage | None = None
    source: Source | None = None
    """A final's picked draft, which it renders again image-to-image at `strength`."""
    strength: float | None = None
    revise: Revise | None = None
    """A revision's parent and mask: the task renders only the mask's region of the parent."""
    upscale: Upscale | None = None
    """An upscale's image and grid: the task renders tile `tile` of it, enlarged."""
    tile: int | None = None
    reroll_of: int | None = None
    """A re-roll's first image: the chain its image joins (`shared.db.rerolls`)."""


@dataclass(frozen=True)
class Source:
    """A draft artifact a final starts from."""

    artifact: int
    url: str


@dataclass(frozen=True)
class Prepared:
    """A task's control maps (and a final's draft, enlarged), made before its batch renders: a task whose
    inputs cannot be read fails alone."""

    work: Work
    maps: tuple[Image.Image, ...]
    preprocess_s: float
    init: Image.Image | None = None
    source_sha256: str | None = None
    mask: Image.Image | None = None
    """A revision's region and band, white, as the inpainting pipeline takes it."""
    share: np.ndarray | None = None
    """A revision's per-pixel share of the new render (`shared.revision.weights`)."""


@dataclass(frozen=True)
class Rendered:
    images: list[Image.Image]
    scheduler: dict[str, Any]
    models: dict[str, Any]
    timings: dict[str, float]
    call: dict[str, int]
    """The pipeline call the images came from: images and tasks in it (1 task: bitwise reproducible alone)."""
    reference: Image.Image
    """The task's first control map, which the images' geometry adherence is scored against."""
    source: SourceRecord | None = None


class Renderer:
    """The rendering half of a worker process; built on its first task, so CUDA starts in that process."""

    def __init__(self, settings: Settings, farm_storage: Storage | None = None) -> None:
        self.settings = settings
        self.device = pick_device(settings.device)
        self.device_model = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type
        """What the farm's cost model files this worker's measures under (`shared.db.costs`)."""
        self.cache = ModelCache(
            settings.models_dir,
            self.device,
            default_dtype(self.device),
            controlnet_budget_bytes=settings.controlnet_cache_bytes,
            offload_budget_bytes=settings.offload_cache_bytes,
            settings=settings,
        )
        self.storages = Storages(settings)
        self.maps = ControlMaps(
            farm_storage,
            settings.models_dir,
            self.device,
            read=self.storages.read,
            max_pixels=settings.max_image_pixels,
        )
        self.sizer = BatchSizer(self.device)
        gigabytes = settings.device_memory_gb
        self.memory = device_memory(self.device) if gigabytes is None else int(gigabytes * 2**30)
        """Bytes this worker's device offers model stacks: `device_memory_gb`, else all the device has."""
        self.fleet = FleetCompileCache(farm_storage, self.device)
        self._revision_inputs: tuple[tuple[object, ...], tuple[Image.Image, Image.Image, np.ndarray]] | None = None
        """The last revision's parent, mask and shares: its job's tasks share them."""
        self._upscale_source: tuple[str | None, Image.Image] | None = None
        """The last upscale's image, decoded, by content hash: its tiles share it."""
        self._board_images: tuple[tuple[str, ...], tuple[Image.Image, ...]] | None = None
        """The last mood board's images, decoded, by content hashes: its style's next tasks share them."""

    def snapshot(self) -> tuple[list[str], int, int]:
        """Resident models, loads and stack swaps, for the worker's row."""
        return self.cache.resident(), sum(self.cache.loads.values()), self.cache.swaps

    def stack_bytes(self, profile: Profile) -> int:
        """What the profile's models hold on this device (`workers.engine.footprint`), before any loads."""
        self._pin(profile)
        family = self.cache.family(profile.base)
        nets = self._unit_models(profile)
        return stack_bytes(
            self.cache.location(profile.base),
            [self.cache.location(net) for net in dict.fromkeys(nets) if net != profile.base],  # FLUX.1 Control's
            None if profile.vae is None else self.cache.location(profile.vae),
            family_dtype(self.cache.dtype, family),
            profile.text_encoders,
            None if profile.quantize_base == "none" else profile.quantize_base,
        )

    def _lora(self, style: Style) -> Lora | None:
        """A style pack's LoRA, from this worker's model cache (fetched once per content hash and checked
        against the hash the job pinned)."""
        if not style.loras:
            return None
        lora = style.loras[0]
        digest = lora.file_sha256
        assert digest is not None  # pinned at submit

        def fetch(folder: Path) -> None:
            data = self.storages.read(lora.file, max_bytes=MAX_LORA_BYTES)
            if content_hash(data) != digest:
                raise InputError(f"style {style.name}: its LoRA {lora.file} changed after the job was submitted")
            (folder / LORA_FILE).write_bytes(data)

        with input_errors(f"style {style.name}: LoRA {lora.file}"):
            folder = built_once(self.settings.models_dir / "loras" / digest, fetch)
        return Lora(str(folder / LORA_FILE), lora.weight, digest)

    def _board(self, style: Style) -> Board | None:
        """A style pack's mood board, its images read, checked against the hashes the job pinned, and decoded
        (kept for the style's next tasks)."""
        reference = style.reference
        if reference is None:
            return None
        digests = tuple(reference.images_sha256 or ())
        if self._board_images is None or self._board_images[0] != digests:
            images = []
            for url, digest in zip(reference.images, digests, strict=True):
                where = f"style {style.name}: mood board image {url}"
                with input_errors(where):
                    data = self.storages.read(url, max_bytes=self.settings.max_plan_bytes)
                    if content_hash(data) != digest:
                        raise InputError(f"{where}: changed after the job was submitted")
                    images.append(decode_image(data, url, max_pixels=self.settings.max_image_pixels))
            self._board_images = (digests, tuple(images))
        return Board(self._board_images[1], digests, reference.scale, reference.transfer)

    def _ip_adapter(self, profile: Profile) -> IPAdapter:
        """Where the IP-Adapter for the profile's base loads from (`shared.registry.IP_ADAPTERS`)."""
        try:
            model, weights, encoder = ip_adapter(profile.base, self.cache.family(profile.base))
        except ValueError as error:
            raise InvalidInput(str(error)) from None
        return IPAdapter(model, self.cache.location(model), weights, encoder)

    def _unit_models(self, profile: Profile) -> list[str]:
        """The network each unit runs with: the union serving them all, the one it names, or its kind's default
        for the base's family (ControlNet or T2I-Adapter; a FLUX.1 Control base itself)."""
        family = self.cache.family(profile.base)
        return [
            profile.union or unit.model or default_controlnet(profile.base, unit.kind, family, profile.adapters)
            for unit in profile.controls
        ]

    def _pin(self, profile: Profile) -> None:
        """Models published by URL are fetched in the version the job was submitted with, never a later one."""
        for unit in profile.controls:
            if unit.model is not None and is_url(unit.model):
                self.cache.pin(unit.model, unit.model_sha256)

    def images_per_call(self, profile: Profile, cap: int) -> int:
        """How many images to gather into one call for this profile (`workers.engine.batching`)."""
        return self.sizer.images(
            _stack(profile),
            profile.width * profile.height / 1e6,
            cap,
            auto=profile.batch == "auto",
            one_task=profile.seeds_per_task,
        )

    def prepare(self, work: Work) -> Prepared:
        """The task's control maps, at the render size (cached by content, see `ControlMaps`)."""
        started = time.perf_counter()
        if work.upscale is not None:
            return self._tile(work, work.upscale, started)
        profile = work.profile
        plan = functools.cache(lambda: self._plan(work))  # read and decoded only if a map must be computed
        maps = tuple(
            self.maps.get(unit, work.plan_digest, plan, profile.base, profile.width, profile.height, work.plan_name)
            for unit in profile.controls
        )
        if work.revise is not None:
            parent, mask, share = self._revision(work, work.revise)
            return Prepared(work, maps, time.perf_counter() - started, parent, mask=mask, share=share)
        if work.source is None:
            return Prepared(work, maps, time.perf_counter() - started)
        init, digest = self._source(work, work.source)
        return Prepared(work, maps, time.perf_counter() - started, init, digest)

    def render(self, batch: list[Prepared], on_step: StepFn | None) -> list[Rendered]:
        """Every prepared task of one profile in one call (each of its seeds an image); per task, its images."""
        profile = batch[0].work.profile
        items = [
            Item(task.work.style.prompt, task.work.style.negative_prompt, seed, task.maps, task.init, task.mask)
            for task in batch
            for seed in task.work.seeds
        ]
        started = time.perf_counter()
        work = batch[0].work
        board = self._board(work.style)
        result, units, _ = self._call(profile, items, on_step, work.strength, self._lora(work.style), board)
        render_s = time.perf_counter() - started
        models: dict[str, Any] = {
            "base": self._identity(profile.base),
            "controlnets": [self._identity(unit.model) for unit in units],
        }
        if profile.vae is not None:
            models["vae"] = self._identity(profile.vae)
        if board is not None:
            models["ip_adapter"] = self._identity(self._ip_adapter(profile).name)
        call = {"images": len(items), "tasks": len(batch)}
        images = iter(result.images)
        return [
            Rendered(
                images=[_kept(task, next(images)) for _ in task.work.seeds],  # type: ignore[arg-type]
                scheduler=result.scheduler,
                models=models,
                timings={"preprocess_s": task.preprocess_s, "render_s": render_s},
                call=call,
                reference=task.maps[0],
                source=_source_record(task),
            )
            for task in batch
        ]

    def warm(self, profile: Profile, images: int) -> Warmth | None:
        """One call of `images` images on blank control maps, so the fleet's compile cache holds the profile's
        compiled code for that batch before a job needs it (`archfarm warmup`); None when the profile does
        not compile on this device."""
        blank = Image.new("RGB", (profile.width, profile.height), "white")
        items = [Item("warmup", "", seed, tuple(blank for _ in profile.controls)) for seed in range(images)]
        return self._call(profile, items, None)[2]

    def _call(
        self,
        profile: Profile,
        items: list[Item],
        on_step: StepFn | None,
        strength: float | None = None,
        lora: Lora | None = None,
        board: Board | None = None,
    ) -> tuple[RenderResult, list[Unit], Warmth | None]:
        """One pipeline call, sized and, when compiled, served by the fleet's compile cache."""
        self._pin(profile)
        units = [
            Unit(model, unit.scale, unit.start, unit.end)
            for model, unit in zip(self._unit_models(profile), profile.controls, strict=True)
        ]
        options = compile_options(profile, self.device)
        self.sizer.start()
        request = Request(
            base=profile.base,
            units=units,
            items=items,
            steps=profile.steps,
            guidance_scale=profile.guidance_scale,
            width=profile.width,
            height=profile.height,
            scheduler=profile.scheduler,
            vae=profile.vae,
            quantize=None if profile.quantize == "none" else profile.quantize,
            compile=options,
            strength=strength,
            text_encoders=profile.text_encoders,
            quantize_base=None if profile.quantize_base == "none" else profile.quantize_base,
            adapters=profile.adapters,
            lora=lora,
            board=board,
            ip_adapter=None if board is None else self._ip_adapter(profile),
            modes=None if profile.union is None else tuple(UNION_MODES[unit.kind] for unit in profile.controls),
        )
        with self._compiled_first(request) as warmth:
            result = render_batch(self.cache, request, on_step)
        self.sizer.measure(_stack(profile), len(items))
        return result, units, warmth

    @contextmanager
    def _compiled_first(self, request: Request) -> Iterator[Warmth | None]:
        """Around a compiled call: the fleet cache's artefacts loaded before a key's first call and stored after a
        cold one, and the memory its CUDA graphs keep counted against the ControlNet budget."""
        options = request.compile
        if options is None:
            yield None
            return
        names = (request.base, request.vae or "", request.quantize or "none", *(unit.model for unit in request.units))
        names += (f"base {request.quantize_base}",) if request.quantize_base else ()  # keys without it unchanged
        names += ("t2i-adapters",) if request.adapters else ()
        key = CompileKey(
            tuple(self._portable(name) for name in names),
            request.width,
            request.height,
            self.cache.bucket(compiled_shape(request), len(request.items)),
            str(family_dtype(self.cache.dtype, self.cache.family(request.base))),
            options,
            request.scheduler,
            request.guidance_scale > 1,
            tuple((unit.start, unit.end) for unit in request.units),
        )
        cuda = self.device.type == "cuda"
        with self.fleet.around(key) as warmth:
            before = _held(self.device) if cuda else (0, 0)
            if warmth.state != "compiled":
                shape = f"{key.width}×{key.height}, batch {key.batch}"
                log.info("first compiled call of %s at %s in this process: %s", names[0], shape, warmth.state)
            yield warmth
            if cuda and warmth.state != "compiled":
                # The growth of reserved memory less that of allocated memory: models the call loaded stay
                # allocated and are not the graphs' pools.
                (reserved, allocated), (reserved_before, allocated_before) = _held(self.device), before
                self.cache.graph_bytes += max(0, (reserved - reserved_before) - (allocated - allocated_before))

    def _identity(self, ref: str) -> dict[str, Any]:
        """A model as loaded (`ModelCache.identity`) and its licence where archfarm knows it, for the sidecar."""
        identity = self.cache.identity(ref)
        try:
            licence = licence_of(ref) or declared(published.local_declaration(Path(str(identity["location"]))), ref)
        except ValueError:  # refused at submit; a folder changed since records no licence rather than fail
            licence = None
        return {**identity, **({"licence": licence.name} if licence else {})}

    def _portable(self, name: str) -> str:
        """A model's name as the fleet knows it: a local folder by its weights' sha256, not by its path here."""
        if not is_path(name):
            return name
        return f"sha256:{self.cache.identity(name)['sha256']}"

    def upload(self, work: Work, rendered: Rendered) -> list[dict[str, Any]]:
        """Every image, its thumbnail and its sidecar into the job's output; the artifact rows to record for them."""
        storage = self.storages.open(work.output_url)
        return [
            self._upload(work, storage, seed, key, image, rendered)
            for seed, key, image in zip(work.seeds, work.outputs, rendered.images, strict=True)
        ]

    def _source(self, work: Work, source: Source) -> tuple[Image.Image, str]:
        """A final's draft, enlarged to the final size (Lanczos), and its content hash. A draft gone from
        storage fails its final alone, for good: the job's other finals start from drafts of their own."""
        try:
            image, digest = self._stored_image(f"draft {source.artifact} of plan {work.plan_name!r}", source.url)
        except InputError as error:
            raise PermanentError(str(error)) from None
        size = (work.profile.width, work.profile.height)
        return image.convert("RGB").resize(size, Image.Resampling.LANCZOS), digest

    def _tile(self, work: Work, upscale: Upscale, started: float) -> Prepared:
        """A tile's start and maps: its part of the image, enlarged to the tile (Lanczos, from the image's own
        pixels: the enlarged whole is never made), which is also the tile unit's map; the plan's maps are
        made at the enlarged size and cut to the tile. The image is the job's own: one that cannot be read,
        or changed since the submit, fails the job's queued tasks."""
        assert work.tile is not None  # an upscale's task is a tile
        grid = upscale.grid()
        if self._upscale_source is None or self._upscale_source[0] != upscale.image_sha256:
            image, _ = self._stored_image("upscale.image", upscale.image, upscale.image_sha256)
            self._upscale_source = (upscale.image_sha256, image.convert("RGB"))
        source = self._upscale_source[1]
        left, top, right, bottom = grid.box(work.tile)
        fx, fy = source.width / grid.width, source.height / grid.height
        side = (grid.tile, grid.tile)
        crop = source.resize(side, Image.Resampling.LANCZOS, box=(left * fx, top * fy, right * fx, bottom * fy))
        plan = functools.cache(lambda: self._plan(work))
        maps = tuple(
            crop
            if isinstance(unit, TileControl)
            else self.maps.get(
                unit, work.plan_digest, plan, work.profile.base, grid.width, grid.height, work.plan_name
            ).crop((left, top, right, bottom))
            for unit in work.profile.controls
        )
        return Prepared(work, maps, time.perf_counter() - started, crop, upscale.image_sha256)

    def _revision(self, work: Work, revise: Revise) -> tuple[Image.Image, Image.Image, np.ndarray]:
        """A revision's parent image, the mask of what the pipeline renders anew (region and band) and each
        pixel's share of it, made once for all the job's tasks this process renders in a row. Both inputs are
        the job's own: one that cannot be read, or changed since the submit, fails the job's queued tasks."""
        size = (work.profile.width, work.profile.height)
        key = (revise.image_sha256, revise.mask_sha256, revise.feather, size)
        if self._revision_inputs is not None and self._revision_inputs[0] == key:
            return self._revision_inputs[1]
        parent, _ = self._stored_image("revise.image", revise.image, revise.image_sha256)
        if parent.size != size:
            raise InputError(f"revise.image is {parent.size[0]}×{parent.size[1]}, not the render's {size[0]}×{size[1]}")
        mask, _ = self._stored_image("revise.mask", revise.mask, revise.mask_sha256)
        share = weights(region(mask, size), revise.feather)
        inputs = parent.convert("RGB"), Image.fromarray(np.where(share > 0, 255, 0).astype(np.uint8)), share
        self._revision_inputs = (key, inputs)
        return inputs

    def _plan(self, work: Work) -> Image.Image:
        """The task's plan, decoded; an `InputError` naming it (by name and URL) when it cannot be had, which
        fails every queued task of that plan with the same reason."""
        name = f"plan {work.plan_name!r}"
        return self._stored_image(name, work.plan_url, work.plan_digest, work.plan_digest)[0]

    def _stored_image(
        self, name: str, url: str, pinned: str | None = None, plan_digest: str | None = None
    ) -> tuple[Image.Image, str]:
        """An input image read from storage and decoded, and its content hash. An `InputError` naming it (name
        and URL) when it cannot be had or no longer has the content `pinned` at submit; `plan_digest` says
        which plan's tasks share it (None: the whole job's)."""
        where = f"{name} ({url})"
        with input_errors(where, plan_digest):
            data = self.storages.read(url)
        digest = content_hash(data)
        if pinned is not None and digest != pinned:
            raise InputError(f"{where}: changed after the job was submitted", plan_digest)
        with input_errors(where, plan_digest):
            return decode_image(data, url, max_pixels=self.settings.max_image_pixels), digest

    def _upload(
        self, work: Work, storage: Storage, seed: int, key: str, image: Image.Image, rendered: Rendered
    ) -> dict[str, Any]:
        timings = dict(rendered.timings)
        started = time.perf_counter()
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)  # level 1: a quarter of the time of 6, ~10% larger
        png = buffer.getvalue()
        timings["encode_s"] = time.perf_counter() - started
        side_key = key.removesuffix(".png") + ".json"
        score = adherence(image, rendered.reference)
        meta = Sidecar(
            job={"id": work.job_id, "name": work.job_name},
            task=work.task_id,
            key=key,
            batch_seeds=work.seeds,
            plan=PlanRecord(name=work.plan_name, url=work.plan_url, sha256=work.plan_digest),
            stage=work.stage,
            source=rendered.source,
            revision=None if work.revise is None else work.revise.model_dump(),
            upscale=None if work.upscale is None else work.upscale.model_dump(mode="json"),
            tile=work.tile,
            adherence=score,
            style=work.style.model_dump(),
            seed=seed,
            profile=work.profile.model_dump(mode="json"),
            models=Models.model_validate(rendered.models),
            scheduler=rendered.scheduler,
            device=str(self.device),
            threads=torch.get_num_threads(),
            timings=timings,
            image_sha256=hashlib.sha256(png).hexdigest(),
            call=rendered.call,
        )
        storage.put(key, png, "image/png")
        # Here, on the upload thread: the next render does not wait for it.
        storage.put(thumbnail_key(key), thumbnail(image), CONTENT_TYPE)
        storage.put(side_key, meta.model_dump_json(indent=2, exclude_none=True).encode(), "application/json")
        return {
            "job_id": work.job_id,
            "task_id": work.task_id,
            "stage": work.stage or "render",
            "parent_id": _parent(work),
            "reroll_of": work.reroll_of,
            "adherence": score,
            "look": look(image),
            "plan_digest": work.plan_digest,
            "style": work.style.name,
            "seed": seed,
            "url": storage.url(key),
            "sidecar_url": storage.url(side_key),
            "width": image.width,
            "height": image.height,
            "size_bytes": len(png),
        }


def _parent(work: Work) -> int | None:
    """The artifact an image was made from: a final's draft, a revision's or an upscale's image."""
    if work.source is not None:
        return work.source.artifact
    found = work.revise or work.upscale
    return None if found is None else found.parent


def _kept(task: Prepared, image: Image.Image) -> Image.Image:
    """A revision's render blended into its parent (every pixel beyond the band the parent's); others as they are."""
    if task.share is None or task.init is None:
        return image
    return composite(task.init, image, task.share)


def _source_record(task: Prepared) -> SourceRecord | None:
    source, work = task.source_sha256, task.work
    if work.upscale is not None and source is not None:
        upscale = work.upscale
        return SourceRecord(artifact=upscale.parent, url=upscale.image, sha256=source, strength=upscale.strength)
    if work.source is None or source is None or work.strength is None:
        return None
    return SourceRecord(artifact=work.source.artifact, url=work.source.url, sha256=source, strength=work.strength)


def compile_options(profile: Profile, device: torch.device) -> CompileOptions | None:
    """How `profile` compiles on `device`: `auto` compiles on CUDA only, where CUDA graphs pay; None is eager."""
    if profile.compile is False or (profile.compile == "auto" and device.type != "cuda"):
        return None
    return CompileOptions(mode=profile.compile_mode, backend=profile.compile_backend)


def _held(device: torch.device) -> tuple[int, int]:
    """The device memory torch's allocator has reserved and the part of it tensors hold."""
    return torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)


def _stack(profile: Profile) -> tuple[object, ...]:
    """What a call's memory per image depends on: the models and the size."""
    units = tuple((unit.kind, unit.model) for unit in profile.controls)
    return (profile.base, profile.vae, profile.quantize, profile.width, profile.height, units)
