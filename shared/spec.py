"""The job spec: what a user submits, validated before anything is stored or queued.

Loadable from YAML or JSON and buildable in Python. Every error names the field and the value (pydantic's
`loc`), and the models forbid unknown keys so a typo is an error rather than a silently ignored setting.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from shared.errors import InvalidInput
from shared.licences import Use
from shared.notify import Event, check_url
from shared.profiles import BUILTIN, builtin_profile
from shared.registry import (
    ADAPTER_FAMILIES,
    SCHEDULERS,
    TRANSFORMER_FAMILIES,
    UNION_MODES,
    check_ref,
    has_default_controlnet,
    is_url,
    known_family,
)
from shared.styles import CATALOG
from shared.tiles import Grid

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""Names end up in object keys and file names, so they are restricted to a path-safe alphabet."""

MAX_SEED = 2**63 - 1
MAX_IMAGES_PER_JOB = 1_000_000
MAX_BATCH_IMAGES = 64
"""Most images one pipeline call renders (`batch: N`); `auto` stays within 16."""
MAX_DEPTH = 32
MAX_VALUES = 2_500_000
"""Room for a job listing a million seeds, 10,000 plans and 1,000 styles."""
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
MAX_NOTIFY_URLS = 5
T = TypeVar("T")
_PLAN_SCHEMES = ("file://", "s3://")

Name = Annotated[str, Field(pattern=NAME_PATTERN)]


@dataclass(frozen=True)
class References:
    """What a spec points at, by field (`plans.0`, `profile.base`): storage URLs (plans, control images,
    datasets, outputs), model references and notification URLs. A remote caller's job may name these only
    within what the farm allows (`producer.remote`), and submit pins the models."""

    urls: list[tuple[str, str]]
    models: list[tuple[str, str]]
    hooks: list[tuple[str, str]] = field(default_factory=list)


class _Strict(BaseModel):
    """Unknown fields refused, and no coercion: `true` is not seed 1, `"2"` is not 2 (an int is still a
    float where a float is wanted)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


ModelRef = Annotated[str, Field(min_length=1, max_length=512)]


class _ControlBase(_Strict):
    """A ControlNet unit. Every field says what it is about, so a control map is cached by what makes it:
    `STACK` fields steer the render (which net, how strongly, when), `SOURCE` fields name the map's input
    where it is not the plan, and each kind's `MAP` fields are its preprocessor's parameters."""

    STACK: ClassVar[frozenset[str]] = frozenset({"kind", "model", "model_sha256", "scale", "start", "end"})
    SOURCE: ClassVar[frozenset[str]] = frozenset()
    MAP: ClassVar[frozenset[str]] = frozenset()

    model: ModelRef | None = Field(
        None, description="ControlNet: preset, hub id, local folder or published model's URL; default per kind."
    )
    model_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="set at submit: the published model's manifest hash"
    )
    scale: float = Field(1.0, ge=0.0, le=2.0, description="controlnet_conditioning_scale")
    start: float = Field(0.0, ge=0.0, le=1.0, description="control_guidance_start, fraction of the steps")
    end: float = Field(1.0, ge=0.0, le=1.0, description="control_guidance_end, fraction of the steps")

    def map_parameters(self) -> dict[str, Any]:
        """What the unit's preprocessor makes its map with: its `MAP` fields' values."""
        return {name: getattr(self, name) for name in sorted(self.MAP)}

    @field_validator("model")
    @classmethod
    def _model_exists(cls, ref: str | None) -> str | None:
        return None if ref is None else check_ref(ref)

    @model_validator(mode="after")
    def _window(self) -> _ControlBase:
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be below end ({self.end})")
        if self.model_sha256 is not None and (self.model is None or not is_url(self.model)):
            raise ValueError("model_sha256 pins a model named by URL (s3://, file:///); this unit names none")
        return self


class CannyControl(_ControlBase):
    """Edges of the plan by adaptive (median-based) Canny."""

    MAP = frozenset({"sigma", "blur"})

    kind: Literal["canny"]
    sigma: float = Field(0.33, gt=0.0, le=1.0, description="threshold spread around the median")
    blur: int = Field(5, ge=0, le=31, description="Gaussian kernel size before Canny (odd; 0 disables)")

    @field_validator("blur")
    @classmethod
    def _odd(cls, blur: int) -> int:
        if blur and blur % 2 == 0:
            raise ValueError(f"blur must be 0 or odd, got {blur}")
        return blur


class DepthControl(_ControlBase):
    """Monocular depth of the plan image by a DPT model (what the seed's archviz pipeline uses)."""

    MAP = frozenset({"depth_model", "resolution"})

    kind: Literal["depth"]
    depth_model: ModelRef | None = Field(
        None, description="DPT model: preset, hub id or folder; default Intel/dpt-large (tiny-dpt for tiny bases)"
    )
    resolution: int = Field(384, ge=32, le=2048, description="the square input size of the depth model")

    @field_validator("depth_model")
    @classmethod
    def _depth_model_exists(cls, ref: str | None) -> str | None:
        return None if ref is None else _not_by_url(check_ref(ref))


class PlanDepthControl(_ControlBase):
    """Depth from the plan's geometry: walls near, floors receding from them, the outside far."""

    MAP = frozenset({"threshold", "wall_px", "gap_px", "falloff_px", "floor", "rim"})

    kind: Literal["plan-depth"]
    threshold: int = Field(128, ge=1, le=255, description="gray level below which a pixel is ink")
    wall_px: int = Field(4, ge=1, le=64, description="thinnest stroke that counts as a wall (plan at 1024 px)")
    gap_px: int = Field(96, ge=0, le=512, description="openings narrower than this (doors) close the outline")
    falloff_px: float = Field(48.0, gt=0, le=1024, description="distance over which floor falls from rim to floor")
    floor: int = Field(96, ge=1, le=254, description="depth level of open floor")
    rim: int = Field(176, ge=1, le=254, description="depth level of floor beside a wall")

    @model_validator(mode="after")
    def _levels(self) -> PlanDepthControl:
        if self.rim < self.floor:
            raise ValueError(f"rim ({self.rim}) must not be below floor ({self.floor})")
        return self


class PlanImageControl(_ControlBase):
    """The plan image itself, fitted to the render size, as the control map."""

    kind: Literal["none"]


class ImageControl(_ControlBase):
    """A control map made elsewhere (pose, segmentation, line art), used as it is."""

    SOURCE = frozenset({"image", "image_sha256"})

    kind: Literal["image"]
    image: str = Field(min_length=1, max_length=2048, description="path, file:// or s3:// URL of the map")
    image_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="set at submit: the map's content hash, part of the profile"
    )

    @field_validator("image")
    @classmethod
    def _image_url(cls, image: str) -> str:
        return _input_url(image)


class TileControl(_ControlBase):
    """The image an upscale enlarges, cut to the tile, as the control map of a tile ControlNet: what keeps each
    tile's content that of the image while its detail is rendered anew (`upscale.control` only)."""

    kind: Literal["tile"] = "tile"


ControlUnit = Annotated[
    CannyControl | DepthControl | PlanDepthControl | PlanImageControl | ImageControl | TileControl,
    Field(discriminator="kind"),
]
CONTROL_KINDS = ("canny", "depth", "plan-depth", "none", "image")
"""The kinds a profile's units may be (`tile` is an upscale's own unit)."""


class Profile(_Strict):
    """How to render: models, control units, sampler settings and batching."""

    base: ModelRef = "tiny-sd15"
    controls: list[ControlUnit] = Field(min_length=1, max_length=4)
    steps: int = Field(20, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0.0, le=30.0)
    width: int = Field(512, ge=64, le=2048)
    height: int = Field(512, ge=64, le=2048)
    seeds_per_task: int = Field(1, ge=1, le=64, description="seeds per task: how a job is cut, not how a GPU is fed")
    batch: Literal["auto"] | Annotated[int, Field(ge=1, le=MAX_BATCH_IMAGES)] = Field(
        "auto",
        description="images per pipeline call, gathered from several tasks: `auto` sizes it for the device (one "
        "task per call on a CPU); a number caps it",
    )
    scheduler: Literal[SCHEDULERS] = "default"  # type: ignore[valid-type]
    vae: ModelRef | None = Field(None, description="a separate VAE, e.g. an fp16-safe SDXL VAE")
    compile: Literal["auto"] | bool = Field(
        "auto",
        description="torch.compile the UNet and ControlNets (once per fleet, stack, size and batch bucket): `auto` "
        "on CUDA devices (CUDA graphs replay each step), never on a CPU, where compiling does not pay",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "reduce-overhead"
    )
    compile_backend: Literal["inductor", "aot_eager", "eager", "cudagraphs"] = "inductor"
    quantize: Literal["none", "int8"] = Field("none", description="int8 weight-only ControlNets (torchao)")
    quantize_base: Literal["none", "int8"] = Field(
        "none",
        description="int8 weight-only denoiser of the base (its UNet or transformer; torchao): FLUX.1's transformer "
        "in half the memory, so its stack fits a smaller card",
    )
    text_encoders: Literal["device", "cpu"] = Field(
        "device",
        description="where the base's text encoders are held: `cpu` keeps them out of device memory (FLUX's T5: "
        "9.5 GB), so the stack fits a smaller card; each prompt pair is encoded there once per worker",
    )
    union: ModelRef | None = Field(
        None,
        description="an SDXL ControlNet-Union serving every unit in one pass, each unit one of its modes (canny, "
        "depth, plan-depth, tile); the units then name no model",
    )

    adapters: bool = Field(
        False,
        description="the units run as T2I-Adapters (SD 1.5, SDXL): once per image instead of at every step; each "
        "unit a scale, every unit starting at 0 and ending together (SDXL; SD 1.5 runs them to the end)",
    )

    @model_validator(mode="after")
    def _adapter_units(self) -> Profile:
        if not self.adapters:
            return self
        if self.union is not None:
            raise ValueError("adapters: a profile runs T2I-Adapters or a ControlNet-Union, not both")
        family = known_family(self.base)
        if family is not None and family not in ADAPTER_FAMILIES:
            raise ValueError(f"adapters: T2I-Adapters are made for SD 1.5 and SDXL, not {self.base!r}")
        ends = {unit.end for unit in self.controls}
        if any(unit.start for unit in self.controls) or len(ends) > 1:
            raise ValueError("controls: T2I-Adapters start at 0 and end together (one adapter_conditioning_factor)")
        if family == "sd15" and ends != {1.0}:
            raise ValueError("controls: SD 1.5's adapter pipeline runs its T2I-Adapters to the end; set end: 1")
        return self

    @field_validator("union")
    @classmethod
    def _union_exists(cls, ref: str | None) -> str | None:
        return None if ref is None else check_ref(ref)

    @model_validator(mode="after")
    def _union_units(self) -> Profile:
        if self.union is None:
            return self
        if known_family(self.base) not in ("sdxl", None):
            raise ValueError(f"union: ControlNet-Union is made for SDXL, not {self.base!r}")
        for index, unit in enumerate(self.controls):
            if unit.model is not None:
                raise ValueError(f"controls.{index}.model: the union serves every unit; name no model of its own")
            if unit.kind not in UNION_MODES:
                raise ValueError(
                    f"controls.{index}: a union has no {unit.kind!r} mode (it has {', '.join(UNION_MODES)})"
                )
        return self

    @model_validator(mode="after")
    def _transformer_family(self) -> Profile:
        """What a FLUX.1 or SD 3 base known by name cannot do, refused at submit (one read from its config is
        refused by the worker, in the same words)."""
        family = known_family(self.base)
        if family not in TRANSFORMER_FAMILIES:
            return self
        if self.scheduler != "default":
            raise ValueError(f"scheduler: {family} samples with its own flow-matching scheduler; set default")
        if self.width % 16 or self.height % 16:
            raise ValueError(f"{family} renders sizes that are multiples of 16, not {self.width}×{self.height}")
        if family == "flux-control":
            unit = self.controls[0]
            if len(self.controls) != 1 or unit.model is not None:
                raise ValueError(
                    f"controls: {self.base!r} is a FLUX.1 Control model: it takes one control map as input channels, "
                    "so give one unit that names no model"
                )
            if (unit.scale, unit.start, unit.end) != (1.0, 0.0, 1.0):
                raise ValueError(
                    f"controls.0: {self.base!r} is a FLUX.1 Control model: its unit takes no scale or window"
                )
        return self

    @field_validator("base", "vae")
    @classmethod
    def _base_exists(cls, ref: str | None) -> str | None:
        return None if ref is None else _not_by_url(check_ref(ref))

    @model_validator(mode="after")
    def _controlnets_known(self) -> Profile:
        """Every unit without a `model` needs a default ControlNet for its kind (the same kinds in each family,
        so this holds whatever the base turns out to be)."""
        for index, unit in enumerate(self.controls):
            has_default = has_default_controlnet(self.base, unit.kind, self.adapters)
            if unit.model is None and self.union is None and not has_default:
                raise ValueError(f"controls.{index}.model: no default {unit.kind!r} ControlNet; name a model")
        return self

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"{value} is not a multiple of 8")
        return value

    def from_noise_only(self) -> str | None:
        """What makes the profile render text-to-image only (a FLUX.1 or SD 3 base, T2I-Adapters), or None:
        archfarm has no image-to-image or inpainting pipeline for them, so stages, revisions and upscales refuse
        it."""
        if known_family(self.base) in TRANSFORMER_FAMILIES:
            return self.base
        return "a T2I-Adapter profile" if self.adapters else None

    def models(self) -> list[tuple[str, str]]:
        """The models the profile names, by field (defaults, for units naming none, are not named here)."""
        found = [("base", self.base)] + ([("vae", self.vae)] if self.vae else [])
        found += [("union", self.union)] if self.union else []
        for i, unit in enumerate(self.controls):
            if unit.model is not None:
                found.append((f"controls.{i}.model", unit.model))
            if isinstance(unit, DepthControl) and unit.depth_model is not None:
                found.append((f"controls.{i}.depth_model", unit.depth_model))
        return found

    def digest(self) -> str:
        """Content hash of the settings: part of every output key, so a changed profile never overwrites.

        `batch` and `text_encoders` are left out: they say how a worker feeds its device, not what an image is,
        and a task rewrites the same keys whatever batch it shares. A unit's `model_sha256` counts only when set,
        so profiles naming no model by URL keep the digests (and the output keys) they had before it existed."""
        unpinned = {i: {"model_sha256"} for i, unit in enumerate(self.controls) if unit.model_sha256 is None}
        # Profiles from before unions, adapters and quantised bases keep their digests.
        unset = {name: True for name in ("union", "adapters") if not getattr(self, name)}
        unset |= {"quantize_base": True} if self.quantize_base == "none" else {}
        return _digest(
            self.model_dump(mode="json", exclude={"batch": True, "text_encoders": True, "controls": unpinned, **unset})
        )


class StyleLora(_Strict):
    """A style's LoRA (one `.safetensors` file of UNet LoRA weights, e.g. trained on a studio's own renders),
    applied to the base's UNet at `weight`. Workers swap it in place between tasks (`workers.engine.loras`)."""

    file: str = Field(min_length=1, max_length=2048, description="path, file:// or s3:// URL of the .safetensors")
    file_sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="set at submit: the file's content hash, part of the style"
    )
    weight: float = Field(1.0, ge=0.0, le=2.0)

    @field_validator("file")
    @classmethod
    def _file_url(cls, file: str) -> str:
        return _input_url(file)


class Reference(_Strict):
    """A style pack's mood board: images its renders take their look from through an IP-Adapter. `transfer:
    style` injects them only where style lives in the UNet (InstantStyle: the middle attention layer of the first
    up block with attention), so the boards' layout does not leak into the render; `all` everywhere."""

    images: list[Annotated[str, Field(min_length=1, max_length=2048)]] = Field(min_length=1, max_length=8)
    images_sha256: list[str] | None = Field(None, description="set at submit: each image's content hash")
    scale: float = Field(0.8, ge=0.0, le=2.0, description="the IP-Adapter's scale where it acts")
    transfer: Literal["style", "all"] = "style"

    @field_validator("images")
    @classmethod
    def _image_urls(cls, images: list[str]) -> list[str]:
        return [_input_url(image) for image in images]


class Style(_Strict):
    name: Name
    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str = Field("", max_length=2000)
    loras: list[StyleLora] = Field(
        default_factory=list, max_length=1, description="a style pack's LoRA (`archfarm styles add --lora`)"
    )
    reference: Reference | None = Field(
        None, description="a style pack's mood board (`archfarm styles add --reference IMG`)"
    )
    palette: list[Annotated[str, Field(pattern=r"^#[0-9A-Fa-f]{6}$")]] | None = Field(
        None,
        min_length=1,
        max_length=12,
        description="a style pack's palette (#rrggbb colours): each view is measured against it "
        "(`archfarm styles add --palette`)",
    )
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(
        None,
        min_length=1,
        max_length=1000,
        description="a style pack's seed family: the seeds its images take, in order, whatever the job's seeds "
        "(the job's say how many); re-rolls take the next (`archfarm styles add --seeds`)",
    )

    @field_validator("seeds")
    @classmethod
    def _unique_family(cls, seeds: list[int] | None) -> list[int] | None:
        return seeds if seeds is None else _unique_seeds(seeds)

    @property
    def packed(self) -> bool:
        """Whether the style carries weights or images beyond its prompts (a call renders one such style)."""
        return bool(self.loras) or self.reference is not None

    def digest(self) -> str:
        """A style without a LoRA, references or seed family keeps the digest (and so the output keys) it had
        before packs."""
        unset = {name for name in ("loras", "reference", "palette", "seeds") if not getattr(self, name)}
        return _digest(self.model_dump(mode="json", exclude=unset))


@dataclass(frozen=True)
class SeedFamily:
    """A style's seeds in order: the first `count` are its images', each next block of `count` one more
    re-roll of each of them (`JobSpec.reroll`). Past the `listed` seeds it runs on from the largest, so the
    family of a `{start, count}` range is that range continued, and every member is distinct."""

    listed: Sequence[int]
    count: int

    def member(self, index: int) -> int:
        return self.listed[index] if index < len(self.listed) else self._top + 1 + index - len(self.listed)

    def seeds(self) -> Sequence[int]:
        """The images' seeds (a range stays a range: a job may list a million)."""
        if len(self.listed) >= self.count:
            return self.listed[: self.count]
        return [*self.listed, *range(self._top + 1, self._top + 1 + self.count - len(self.listed))]

    def reroll(self, seed: int, attempt: int) -> int:
        """The seed of the `attempt`-th re-roll (from 1) of the image rendered with `seed`."""
        return self.member(self.count * attempt + self._index(seed))

    @cached_property
    def _top(self) -> int:
        return self.listed[-1] if isinstance(self.listed, range) else max(self.listed)

    def _index(self, seed: int) -> int:
        if seed > self._top:
            index = len(self.listed) + seed - self._top - 1
        else:
            index = self.listed.index(seed)
        if index >= self.count:
            raise ValueError(f"seed {seed} is not one of the style's first {self.count}")
        return index


class SeedRange(_Strict):
    count: int = Field(ge=1, le=MAX_IMAGES_PER_JOB)
    start: int = Field(0, ge=0, le=MAX_SEED)


class Reroll(_Strict):
    """Images whose geometry adherence is under `below` are rendered again with the next seeds of their
    family (`SeedFamily`), at most `times` times each; the best of each image's renders is kept, the others
    stay stored, marked as superseded by it."""

    below: float = Field(gt=0.0, le=1.0, description="adherence (0-1) under which an image is rendered again")
    times: int = Field(2, ge=1, le=8, description="most re-rolls of one image")


DEFAULT_EVENTS: tuple[Event, ...] = ("finished",)


class Notify(_Strict):
    """Where a job reports its events (`shared.notify`): one signed JSON POST per event and URL."""

    urls: list[Annotated[str, Field(max_length=2048)]] = Field(min_length=1, max_length=MAX_NOTIFY_URLS)
    events: list[Event] = Field(
        default_factory=lambda: list(DEFAULT_EVENTS),
        min_length=1,
        max_length=5,
        description="finished (the job ended, however), failed (ended failed or partially_succeeded), "
        "first_failure (a task failed for good), pick_needed (a staged job's drafts wait for a pick), "
        "deadline_at_risk (the farm expects to finish it after its `deadline`)",
    )

    @field_validator("urls")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            check_url(url)
        if len(set(urls)) < len(urls):
            raise ValueError("a URL is named twice")
        return urls

    @field_validator("events")
    @classmethod
    def _events(cls, events: list[Event]) -> list[Event]:
        return _once_each(events, "an event")


Stage = Literal["draft", "final", "tile", "assemble"]
"""A staged job's passes (many cheap drafts, then the picked ones again at full quality), and an upscale's
(its tiles, then the assembly of each image from them)."""


class Draft(_Strict):
    """The cheap first pass of a staged job: what it changes of the profile (the rest is the profile's)."""

    width: int | None = Field(None, ge=64, le=2048)
    height: int | None = Field(None, ge=64, le=2048)
    steps: int | None = Field(None, ge=1, le=150)
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"{value} is not a multiple of 8")
        return value


Grouping = Literal["plan", "style"]
GROUPINGS: tuple[Grouping, ...] = ("plan", "style")


class Pick(_Strict):
    """The gate between the passes: which drafts go on. `by: hand` waits for `archfarm pick`; `by: adherence`
    takes, once every draft has ended, the `count` best of each group by how well they follow their plan."""

    by: Literal["hand", "adherence"] = "hand"
    per: list[Grouping] = Field(
        default_factory=lambda: list(GROUPINGS), max_length=2, description="what a group of drafts shares"
    )
    count: int = Field(1, ge=1, le=64, description="drafts a rule picks per group")
    timeout: float | None = Field(
        None, gt=0, le=24 * 30, description="hours after the submit when picks by hand close by themselves"
    )

    @field_validator("per")
    @classmethod
    def _fields_once(cls, per: list[Grouping]) -> list[Grouping]:
        return _once_each(per, "a field")


class Final(_Strict):
    """The full-quality pass: each picked draft enlarged `scale` times and rendered again image-to-image with
    the same prompt, seed and ControlNets (maps made at the final size), keeping its composition."""

    scale: float = Field(2.0, ge=1.0, le=4.0, description="final size over the draft's")
    strength: float = Field(0.5, gt=0.0, le=1.0, description="how much of the draft is rendered again (1: all)")


class Revise(_Strict):
    """A revision: an approved image rendered again only where its mask is white (and in a feathered band
    around it), on the same plan's control maps, every pixel beyond the band the parent's own."""

    image: str = Field(min_length=1, max_length=2048, description="the approved image: path, file:// or s3:// URL")
    mask: str = Field(min_length=1, max_length=2048, description="white where to re-render: path or URL")
    feather: int = Field(8, ge=0, le=256, description="pixels over which the new region blends into the parent")
    parent: int | None = Field(None, ge=1, description="the parent's artifact id, for lineage")
    image_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="set at submit")
    mask_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="set at submit")

    @field_validator("image", "mask")
    @classmethod
    def _url(cls, url: str) -> str:
        return _input_url(url)

    def digest(self) -> str:
        """What of the revision decides its images: the parent's and the mask's content, and the feather."""
        return _digest([self.image_sha256, self.mask_sha256, self.feather])


MAX_UPSCALE_SIDE = 8192
"""The longest side an upscale delivers: 6K with room to spare (8192² RGB is 192 MiB assembled)."""
Format = Literal["png", "tiff16", "jpeg"]


class Upscale(_Strict):
    """An image enlarged to delivery size and rendered again tile by tile, image-to-image under a tile
    ControlNet (and, with `plan_units`, the profile's own units on the plan's maps at the new size, cut to the
    tile, so walls stay where the plan has them); the tiles are tasks of their own, blended into one image by
    an assembly task once all are done. One image per seed: each tile's seed is derived from it."""

    image: str = Field(min_length=1, max_length=2048, description="the image to enlarge: path, file:// or s3:// URL")
    parent: int | None = Field(None, ge=1, description="its artifact id, for lineage")
    long_side: int | None = Field(None, ge=256, le=MAX_UPSCALE_SIDE, description="the result's longer side, pixels")
    scale: float | None = Field(None, gt=1.0, le=16.0, description="the result's size over the image's")
    tile: int | None = Field(
        None, ge=128, le=2048, description="tile side in pixels; default 512 (SD 1.5), 1024 (SDXL)"
    )
    overlap: int | None = Field(None, ge=8, le=1024, description="least overlap of neighbouring tiles; default tile/8")
    strength: float = Field(0.35, gt=0.0, le=1.0, description="how much of each enlarged tile is rendered again")
    control: TileControl = Field(default_factory=TileControl, description="the tile ControlNet unit")
    plan_units: bool = Field(True, description="the profile's units steer each tile too, on maps cut to it")
    format: Format = Field("png", description="png, tiff16 (16-bit TIFF) or jpeg (quality 95)")
    image_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="set at submit")
    image_size: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=2, max_length=2, description="set at submit: the image's width and height"
    )

    @field_validator("image")
    @classmethod
    def _url(cls, url: str) -> str:
        return _input_url(url)

    @field_validator("tile", "overlap")
    @classmethod
    def _multiple_of_8(cls, value: int | None) -> int | None:
        if value is not None and value % 8:
            raise ValueError(f"{value} is not a multiple of 8")
        return value

    @model_validator(mode="after")
    def _one_size(self) -> Upscale:
        if (self.long_side is None) == (self.scale is None):
            raise ValueError("give the result's size as long_side or as scale (one of them)")
        if self.tile is not None and self.overlap is not None and self.overlap * 2 > self.tile:
            raise ValueError(f"overlap {self.overlap} is over half the tile ({self.tile})")
        return self

    def with_tiles(self, family: str | None) -> Upscale:
        """Tile and overlap filled in for the base's family (SDXL 1024, SD 1.5 512; overlap an eighth), at
        submit: the grid, and so the job's tasks, must not depend on what a worker later reads."""
        if self.tile is not None:
            return self if self.overlap is not None else self.model_copy(update={"overlap": self.tile // 8})
        if family is None:
            raise InvalidInput("upscale.tile: the base is known only by its config; name the tile size")
        tile = 1024 if family == "sdxl" else 512
        return self.model_copy(update={"tile": tile, "overlap": self.overlap or tile // 8})

    def size(self) -> tuple[int, int]:
        """The result's width and height (multiples of 8) from the image's size (known once submitted)."""
        assert self.image_size is not None  # set at submit
        width, height = self.image_size
        factor = self.scale if self.scale is not None else self.long_side / max(width, height)  # type: ignore[operator]
        return round(width * factor / 8) * 8, round(height * factor / 8) * 8

    def grid(self) -> Grid:
        assert self.tile is not None and self.overlap is not None  # set at submit
        width, height = self.size()
        return Grid(width, height, self.tile, self.overlap)

    def digest(self) -> str:
        """What of the upscale decides its tiles: the image's content and every setting but where it was read."""
        return _digest(self.model_dump(mode="json", exclude={"image", "parent"}))


class JobSpec(_Strict):
    """A render job: every plan × style × seed rendered with one profile (the default kind of job)."""

    kind: Literal["render"] = "render"
    name: Name = "job"
    priority: int = Field(50, ge=0, le=100, description="0-100, higher runs first")
    deadline: AwareDatetime | None = Field(
        None,
        strict=False,  # JSON and YAML give a string (or YAML a datetime)
        description="when it should be done, with its zone (`2026-12-08T07:00:00+01:00`): earliest first within a "
        "priority; flagged, and `deadline_at_risk` notified, once the farm expects to miss it",
    )
    plans: list[Annotated[str, Field(min_length=1, max_length=2048)]] = Field(min_length=1, max_length=10_000)
    styles: list[Name | Style] = Field(min_length=1, max_length=1000)
    seeds: SeedRange | list[Annotated[int, Field(ge=0, le=MAX_SEED)]]
    profile: Profile
    output: str | None = Field(
        None, min_length=1, max_length=2048, description="file:// or s3:// prefix; default: settings"
    )
    pool: Name | None = Field(
        None, description="the workers that render it: those started with `archfarm worker --pool NAME`"
    )
    notify: Notify | None = Field(None, description="URLs told when the job ends or fails; default: settings")
    draft: Draft | None = Field(None, description="a staged job's cheap pass (with `pick` and `final`)")
    pick: Pick | None = Field(None, description="how a staged job's drafts are picked for the final pass")
    final: Final | None = Field(None, description="how a staged job's picks are rendered at full quality")
    revise: Revise | None = Field(None, description="re-render a masked region of an approved image")
    upscale: Upscale | None = Field(None, description="enlarge an image to delivery size, tile by tile")
    use: Use | None = Field(
        None, description="commercial or non-commercial: the model licences it may use; default ARCHFARM_USE"
    )
    reroll: Reroll | None = Field(None, description="render images that do not follow their plan again")

    @classmethod
    def from_document(
        cls, data: Any, source: str = "", folder: Path | None = None, packs: Callable[[str], Style | None] | None = None
    ) -> JobSpec:
        """Validate a loaded document; relative plan paths in it are taken relative to `folder` (the file's), as a
        user writing it expects; style names are looked up in `packs` (stored style packs) first."""
        if not isinstance(data, dict):
            raise InvalidInput(f"{source}: expected a mapping of job fields")
        plans = data.get("plans")
        if folder is not None and isinstance(plans, list):
            data = {**data, "plans": [_relative_to(p, folder) for p in plans]}
        spec: JobSpec = parse_model(cls, data, source, {"packs": packs})
        return spec

    def digest(self) -> str:
        """What decides its images besides plan, style and seed: the profile's digest (and a revision's)."""
        if self.revise is not None:
            return _digest([self.profile.digest(), self.revise.digest()])
        if self.upscale is not None:
            return _digest([self.profile.digest(), self.upscale.digest()])
        return self.profile.digest()

    def references(self) -> References:
        urls = [(f"plans.{i}", plan) for i, plan in enumerate(self.plans)]
        urls += [
            (f"profile.controls.{i}.image", unit.image)
            for i, unit in enumerate(self.profile.controls)
            if isinstance(unit, ImageControl)
        ]
        if self.output is not None:
            urls.append(("output", self.output))
        if self.revise is not None:
            urls += [("revise.image", self.revise.image), ("revise.mask", self.revise.mask)]
        if self.upscale is not None:
            urls.append(("upscale.image", self.upscale.image))
        for i, style in enumerate(self.resolved_styles):
            urls += [(f"styles.{i}.loras.{j}.file", lora.file) for j, lora in enumerate(style.loras)]
            images = [] if style.reference is None else style.reference.images
            urls += [(f"styles.{i}.reference.images.{j}", image) for j, image in enumerate(images)]
        hooks = [(f"notify.urls.{i}", url) for i, url in enumerate(self.notify.urls if self.notify else [])]
        return References(urls, [(f"profile.{name}", ref) for name, ref in self.profile.models()], hooks)

    @field_validator("plans")
    @classmethod
    def _plan_urls(cls, plans: list[str]) -> list[str]:
        return [_input_url(plan) for plan in plans]

    @field_validator("styles")
    @classmethod
    def _resolve_styles(cls, styles: list[str | Style], info: ValidationInfo) -> list[Style]:
        """Names become styles: a stored pack of that name (`packs` in the validation context, a lookup in the
        farm's storage: `shared.packs`), else a built-in style."""
        packs: Callable[[str], Style | None] | None = (info.context or {}).get("packs")
        resolved = [s if isinstance(s, Style) else (packs and packs(s)) or _builtin_style(s) for s in styles]
        names = [s.name for s in resolved]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate style {dupes[0]!r}")
        return resolved

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: SeedRange | list[int]) -> SeedRange | list[int]:
        if isinstance(seeds, list):
            return _unique_seeds(seeds)
        if seeds.start + seeds.count - 1 > MAX_SEED:
            raise ValueError(f"seeds run past {MAX_SEED}")
        return seeds

    @field_validator("profile", mode="before")
    @classmethod
    def _named_profile(cls, profile: Any) -> Any:
        return builtin_profile(profile) if isinstance(profile, str) else profile

    @model_validator(mode="after")
    def _size_limit(self) -> JobSpec:
        images = len(self.plans) * len(self.styles) * self.seed_count
        if images > MAX_IMAGES_PER_JOB:
            raise ValueError(f"{images} images is over the limit of {MAX_IMAGES_PER_JOB} per job")
        return self

    @model_validator(mode="after")
    def _families(self) -> JobSpec:
        rolls = 0 if self.reroll is None else self.reroll.times
        for index, style in enumerate(self.resolved_styles):
            if (last := self.family(style).member(self.seed_count * (rolls + 1) - 1)) > MAX_SEED:
                raise ValueError(f"styles.{index}: its seeds (re-rolls included) run past {MAX_SEED} (to {last})")
        if self.reroll is not None and (self.staged or self.revise is not None or self.upscale is not None):
            raise ValueError("reroll: only a single-pass render re-rolls (a staged job picks its drafts by adherence)")
        return self

    @model_validator(mode="after")
    def _stages(self) -> JobSpec:
        given = [name for name in ("draft", "pick", "final") if getattr(self, name) is not None]
        if given and len(given) < 3:
            raise ValueError("a staged job needs draft, pick and final together")
        if given and self.revise is not None:
            raise ValueError("a revision has no stages: it re-renders one approved image")
        if (given or self.revise is not None) and (why := self.profile.from_noise_only()):
            raise ValueError(
                f"profile: {why} renders from noise only; stages and revisions render with SD 1.5 or SDXL ControlNets"
            )
        if self.final is not None:
            width, height = self.final_size()
            if max(width, height) > 2048:
                raise ValueError(f"the final size {width}×{height} is over 2048 on a side; lower final.scale")
        return self

    @model_validator(mode="after")
    def _upscale(self) -> JobSpec:
        for index, unit in enumerate(self.profile.controls):
            if isinstance(unit, TileControl):
                raise ValueError(f"profile.controls.{index}: a tile unit is an upscale's own (upscale.control)")
        if self.upscale is None:
            return self
        if why := self.profile.from_noise_only():
            raise ValueError(f"profile: {why} renders from noise only; upscale with SD 1.5 or SDXL ControlNets")
        if self.pick is not None or self.revise is not None:
            raise ValueError("an upscale enlarges one image: it has no stages and is no revision")
        if len(self.plans) != 1 or len(self.styles) != 1:
            raise ValueError("an upscale enlarges one image: give its one plan and its one style")
        if self.upscale.image_size is not None:
            width, height = self.upscale.size()
            if max(width, height) > MAX_UPSCALE_SIDE:
                raise ValueError(f"upscale: {width}×{height} is over {MAX_UPSCALE_SIDE} on a side")
            tile = self.upscale.tile or 0
            if min(width, height) < tile:
                raise ValueError(f"upscale: {width}×{height} is smaller than a tile ({tile}); lower upscale.tile")
        return self

    @property
    def staged(self) -> bool:
        """Whether the job renders drafts, waits for picks and renders finals of them."""
        return self.pick is not None

    def stage_profile(self, stage: Stage | None) -> Profile:
        """The profile a pass renders with: the draft's overrides, or the profile at the final size."""
        if stage == "draft" and self.draft is not None:
            return self.profile.model_copy(update=self.draft.model_dump(exclude_none=True))
        if stage == "final":
            width, height = self.final_size()
            return self.profile.model_copy(update={"width": width, "height": height})
        if stage == "tile" and self.upscale is not None:
            units = [self.upscale.control, *(self.profile.controls if self.upscale.plan_units else [])]
            side = self.upscale.tile
            return self.profile.model_copy(update={"width": side, "height": side, "controls": units})
        return self.profile

    def final_size(self) -> tuple[int, int]:
        """The draft's size times `final.scale`, down to a multiple of 8."""
        assert self.final is not None  # only asked of a staged job
        draft = self.stage_profile("draft")
        return tuple(int(side * self.final.scale) // 8 * 8 for side in (draft.width, draft.height))  # type: ignore[return-value]

    def seed_values(self) -> list[int]:
        return list(self._seed_sequence())

    @property
    def seed_count(self) -> int:
        return self.seeds.count if isinstance(self.seeds, SeedRange) else len(self.seeds)

    def family(self, style: Style) -> SeedFamily:
        """A style's seed family: its pack's, else the job's seeds continued."""
        return SeedFamily(style.seeds or self._seed_sequence(), self.seed_count)

    def _seed_sequence(self) -> Sequence[int]:
        if isinstance(self.seeds, SeedRange):
            return range(self.seeds.start, self.seeds.start + self.seeds.count)
        return self.seeds

    @property
    def resolved_styles(self) -> list[Style]:
        """Styles after catalog lookup (the validator replaced every name by its `Style`)."""
        return [s for s in self.styles if isinstance(s, Style)]


def _input_url(url: str) -> str:
    """A path, or a file:// or s3:// URL: what a job may read its inputs from."""
    if "://" in url and not url.startswith(_PLAN_SCHEMES):
        raise ValueError(f"{url!r}: unsupported URL scheme (use a path, file:// or s3://)")
    return url


def _unique_seeds(seeds: list[int]) -> list[int]:
    if not seeds:
        raise ValueError("no seeds")
    seen: set[int] = set()
    for seed in seeds:
        if seed in seen:
            raise ValueError(f"duplicate seed {seed}")
        seen.add(seed)
    return seeds


def _once_each(values: list[T], what: str) -> list[T]:
    if len(set(values)) < len(values):
        raise ValueError(f"{what} is named twice")
    return values


def _not_by_url(ref: str) -> str:
    """Only ControlNets may be published models for now: nothing pins a base, VAE or depth model's version."""
    if is_url(ref):
        raise ValueError(f"{ref!r}: only a ControlNet (a control unit's `model`) may be named by URL")
    return ref


def _builtin_style(name: str) -> Style:
    if name not in CATALOG:
        raise ValueError(
            f"unknown style {name!r}: no stored pack of that name (`archfarm styles`) and no built-in one "
            f"({', '.join(sorted(CATALOG))})"
        )
    prompt, negative = CATALOG[name]
    return Style(name=name, prompt=prompt, negative_prompt=negative)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


MAX_PROBLEMS = 5
MAX_ECHO = 60
MAX_MESSAGE = 300
"""A problem's message, cut: some quote the value they refuse, and a value may be megabytes long."""


def describe(error: ValidationError, source: str = "") -> str:
    """Every problem as `field.path: message (got value)`, on one line, in archfarm's words: pydantic's
    names for union members and constrained types are left out, a union's alternatives are said once (the
    one the value was meant as, when it matched one's type), and an echoed value is cut short."""
    return describe_errors(error.errors(), source)


def describe_errors(errors: Sequence[Any], source: str = "") -> str:
    """`describe` for pydantic's error list, also as FastAPI reports a malformed request."""
    found: dict[str, list[tuple[str, str, Any]]] = {}
    for err in errors:
        loc = ".".join(_printable(_cut(str(p))) for i, p in enumerate(err["loc"]) if not _internal(err["loc"], i))
        found.setdefault(loc or "job", []).append((err["type"], _message(err), err.get("input")))
    # A union reports every alternative; where one got past the type check (an error deeper down, or one that
    # is not about the type), the others' type errors are noise.
    matched = {loc for loc, errs in found.items() if any(not _type_error(kind) for kind, _, _ in errs)}
    problems = []
    for loc, errs in found.items():
        meant = loc in matched or any(other.startswith(loc + ".") for other in found)
        kept = [(m, got) for kind, m, got in errs if not (meant and _type_error(kind))]
        if not kept:
            continue
        messages = list(dict.fromkeys(m for m, _ in kept))
        if len(messages) > 1 and all(m.startswith("should be ") for m in messages):
            messages = ["should be " + " or ".join(m.removeprefix("should be ") for m in messages)]
        got = kept[0][1]
        shown = ""
        if not isinstance(got, dict | list) and got is not None and not any(str(got) in m for m in messages):
            shown = f" (got {_cut(repr(got))})"
        problems.append(f"{loc}: {_printable(' or '.join(messages))[:MAX_MESSAGE]}{_printable(shown)}")
    more = len(problems) - MAX_PROBLEMS
    problems = problems[:MAX_PROBLEMS] + ([f"and {more} more"] if more > 0 else [])
    return (f"{_printable(source)}: " if source else "") + "; ".join(problems)


def _cut(text: str) -> str:
    """At most `MAX_ECHO` characters of what the user sent (a value, or a key: an unknown key may be megabytes)."""
    return text[:MAX_ECHO] + ("…" if len(text) > MAX_ECHO else "")


def _message(err: Any) -> str:
    """pydantic's message without its own vocabulary (`Input should be a valid dictionary or instance of X`)."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in ("model_type", "dict_type", "model_attributes_type"):
        return "should be a mapping"
    if kind == "string_pattern_mismatch" and ctx.get("pattern") == NAME_PATTERN:
        return "should be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "union_tag_invalid":
        field = str(ctx.get("discriminator", "kind")).strip("'")
        return f"unknown {field} {_cut(repr(ctx.get('tag')))}; one of {ctx.get('expected_tags')}"
    return str(err["msg"]).removeprefix("Value error, ").replace("Input should be", "should be")


def _type_error(kind: str) -> bool:
    """The value is not of the alternative's type at all (as opposed to breaking one of its constraints)."""
    return kind.endswith(("_type", "_parsing")) or kind == "literal_error"


def _internal(loc: tuple[str | int, ...], index: int) -> bool:
    """A location part pydantic adds for itself: a union member's type or class, a validator's name, or the
    tag of a tagged union (`controls.0.canny.scale` is `controls.0.scale` to the user)."""
    text = str(loc[index])
    if text.startswith(("function-", "union[", "constrained-", "list[", "tagged-union[", "literal[")):
        return True
    if text in _MODELS or text in ("bool", "int", "float", "str"):
        return True
    return index > 0 and isinstance(loc[index - 1], int) and text in CONTROL_KINDS


def _printable(text: str) -> str:
    """Control characters escaped, so a message is one line however hostile the input."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def parse_model(model: type[BaseModel], data: Any, source: str = "", context: dict[str, Any] | None = None) -> Any:
    """Validate `data` as `model` (with a validation `context`), turning pydantic's error into `InvalidInput` with
    a one-line message."""
    check_shape(data, source)
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise InvalidInput(describe(e, source)) from None


def check_shape(data: Any, source: str = "") -> None:
    """Refuse data nested deeper or holding more values than any job can: a 1,000-level nesting would blow the
    stack, and YAML aliases can make a few kilobytes stand for billions of values (walking them would hang).
    Iterative, and it stops counting at the limit, so checking costs little whatever the input."""
    where = f"{source}: " if source else ""
    stack: list[tuple[Any, int]] = [(data, 0)]
    seen = 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if depth > MAX_DEPTH:
            raise InvalidInput(f"{where}nested deeper than {MAX_DEPTH} levels")
        if seen > MAX_VALUES:
            raise InvalidInput(f"{where}more than {MAX_VALUES} values")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, list | tuple):
            stack.extend((item, depth + 1) for item in value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice: the later value would silently win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # a list or mapping as a key: the constructor refuses it itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {str(key)[:MAX_ECHO]!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_document(path: Path) -> Any:
    """Read a YAML or JSON file (JSON is YAML) into plain data, with a one-line error if it is unreadable."""
    try:
        if path.stat().st_size > MAX_DOCUMENT_BYTES:
            raise InvalidInput(f"{path}: larger than {MAX_DOCUMENT_BYTES} bytes")
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file") from None
    except RecursionError:
        raise InvalidInput(f"{path}: nested deeper than {MAX_DEPTH} levels") from None
    except yaml.MarkedYAMLError as e:
        raise InvalidInput(f"{path}: {_yaml_problem(e)}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as e:
        raise InvalidInput(
            f"{path}: unreadable ({_printable((str(e).strip().splitlines() or [''])[0])[:200]})"
        ) from None


def _yaml_problem(error: yaml.MarkedYAMLError) -> str:
    """`line 3, column 1: expected ',' or ']', but got '<scalar>' (while parsing a flow sequence at line 2,
    column 11)`: where the parser stopped, counted from 1 as an editor shows it, and what it was reading."""

    def at(mark: yaml.Mark | None) -> str:
        return "" if mark is None else f"line {mark.line + 1}, column {mark.column + 1}"

    where = at(error.problem_mark or error.context_mark)
    problem = error.problem or error.context or "not valid YAML"
    context = ""
    if error.problem and error.context:
        started = at(error.context_mark)
        context = f" ({error.context}{' at ' + started if started and started != where else ''})"
    return _printable(f"{where + ': ' if where else ''}{problem}{context}")[:200]


def load_job(path: Path, packs: Callable[[str], Style | None] | None = None) -> JobSpec:
    """A render job file; relative plan paths are taken relative to the file, style names looked up in
    `packs` first."""
    return JobSpec.from_document(load_document(path), str(path), path.parent, packs)


def _relative_to(plan: Any, folder: Path) -> Any:
    if isinstance(plan, str) and "://" not in plan and not Path(plan).expanduser().is_absolute():
        return str(folder / plan)
    return plan


_MODEL_CLASSES: list[type[BaseModel]] = [Style, SeedRange, Notify, JobSpec, Profile, *_ControlBase.__subclasses__()]
_MODELS = {cls.__name__ for cls in _MODEL_CLASSES}


def load_profile(name_or_path: str) -> Any:
    """`--profile`: a built-in name, or a YAML file holding just the profile mapping."""
    if name_or_path in BUILTIN:
        return parse_model(Profile, BUILTIN[name_or_path], f"profile {name_or_path}")
    path = Path(name_or_path)
    if path.suffix.lower() not in (".yaml", ".yml", ".json") and not path.exists():
        raise InvalidInput(
            f"--profile: {name_or_path!r} is neither a built-in profile ({', '.join(sorted(BUILTIN))}) nor a file"
        )
    data = load_document(path)
    if isinstance(data, dict) and set(data) == {"profile"}:
        data = data["profile"]
    return parse_model(Profile, data, str(path))
