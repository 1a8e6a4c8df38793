"""Every model name a job may use, as pure data: validating a job never looks at this machine's disk.

A model reference is one of: a tiny preset (built offline into each worker's model cache on first use), a
short alias for a published model (its hub id), a hub id `owner/name`, a local folder (an absolute path
once the job is submitted), or the URL of a model published to storage (`s3://bucket/prefix`,
`file:///abs/dir`; `shared.published`), fetched into each worker's model cache. Whether a folder or a hub
id can be loaded is a fact about the machine that runs the task: submit checks it where it can
(`producer.models`), and a worker that cannot load one fails the task with the reason.
"""

from __future__ import annotations

import re
from typing import Literal

Family = Literal["sd15", "sdxl", "flux", "flux-control", "sd3"]
"""A base model's architecture: SD 1.5 and SDXL (UNets), FLUX.1 (a transformer steered by FLUX ControlNets),
FLUX.1 Control (a FLUX transformer taking the control map as extra input channels: the base is its own control
model) and SD 3/3.5 (a transformer steered by SD3 ControlNets)."""

TRANSFORMER_FAMILIES: frozenset[str] = frozenset({"flux", "flux-control", "sd3"})
"""Families whose denoiser is a diffusion transformer sampled by flow matching: no UNet, their own scheduler."""

PRESETS: frozenset[str] = frozenset(
    {
        "tiny-sd15",
        "tiny-canny",
        "tiny-plan",
        "tiny-sdxl",
        "tiny-sdxl-controlnet",
        "tiny-sdxl-union",
        "tiny-dpt",
        "tiny-flux",
        "tiny-flux-controlnet",
        "tiny-flux-control",
        "tiny-sd3",
        "tiny-sd3-controlnet",
        "tiny-sd15-adapter",
        "tiny-sdxl-adapter",
        "tiny-ip-adapter",
    }
)
"""Tiny models built from configs with seeded weights: the offline demo and the tests. `tiny-plan` is trained
(on synthetic plans, so demo renders follow the plan); the others are random."""

ALIASES: dict[str, str] = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd15-canny": "lllyasviel/sd-controlnet-canny",
    "sd15-depth": "lllyasviel/sd-controlnet-depth",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-canny": "diffusers/controlnet-canny-sdxl-1.0",
    "sdxl-depth": "diffusers/controlnet-depth-sdxl-1.0",
    "sd15-tile": "lllyasviel/control_v11f1e_sd15_tile",
    "sdxl-tile": "xinsir/controlnet-tile-sdxl-1.0",
    "sdxl-union": "xinsir/controlnet-union-sdxl-1.0",
    "sdxl-vae-fp16": "madebyollin/sdxl-vae-fp16-fix",  # SDXL's VAE rescaled to decode in fp16 without NaNs
    "flux-dev": "black-forest-labs/FLUX.1-dev",
    "flux-union-pro": "Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro-2.0",  # one net for every kind, no modes
    "flux-canny": "black-forest-labs/FLUX.1-Canny-dev",  # FLUX.1 Control: the map as input channels
    "flux-depth": "black-forest-labs/FLUX.1-Depth-dev",
    "sd35": "stabilityai/stable-diffusion-3.5-large",
    "sd35-canny": "stabilityai/stable-diffusion-3.5-large-controlnet-canny",
    "sd35-depth": "stabilityai/stable-diffusion-3.5-large-controlnet-depth",
    "sd35-blur": "stabilityai/stable-diffusion-3.5-large-controlnet-blur",  # SD 3.5's tile (upscaling) net
    "sd15-canny-adapter": "TencentARC/t2iadapter_canny_sd15v2",
    "sd15-depth-adapter": "TencentARC/t2iadapter_depth_sd15v2",
    "sdxl-canny-adapter": "TencentARC/t2i-adapter-canny-sdxl-1.0",
    "sdxl-depth-adapter": "TencentARC/t2i-adapter-depth-midas-sdxl-1.0",
}

TINY_CONTROLNETS: dict[str, str] = {
    "tiny-sd15": "tiny-canny",
    "tiny-sdxl": "tiny-sdxl-controlnet",
    "tiny-flux": "tiny-flux-controlnet",
    "tiny-sd3": "tiny-sd3-controlnet",
}
"""A tiny base is a test and demo stand-in: its one tiny ControlNet serves every kind of control map."""

DEFAULT_CONTROLNETS: dict[tuple[Family, str], str] = {
    ("sd15", "canny"): ALIASES["sd15-canny"],
    ("sd15", "depth"): ALIASES["sd15-depth"],
    ("sd15", "plan-depth"): ALIASES["sd15-depth"],
    ("sdxl", "canny"): ALIASES["sdxl-canny"],
    ("sdxl", "depth"): ALIASES["sdxl-depth"],
    ("sdxl", "plan-depth"): ALIASES["sdxl-depth"],
    ("sd15", "tile"): ALIASES["sd15-tile"],
    ("sdxl", "tile"): ALIASES["sdxl-tile"],
    ("flux", "canny"): ALIASES["flux-union-pro"],
    ("flux", "depth"): ALIASES["flux-union-pro"],
    ("flux", "plan-depth"): ALIASES["flux-union-pro"],
    ("sd3", "canny"): ALIASES["sd35-canny"],
    ("sd3", "depth"): ALIASES["sd35-depth"],
    ("sd3", "plan-depth"): ALIASES["sd35-depth"],
    ("sd3", "tile"): ALIASES["sd35-blur"],
}
KINDS_WITH_DEFAULT: frozenset[str] = frozenset(kind for _, kind in DEFAULT_CONTROLNETS)

TINY_ADAPTERS: dict[str, str] = {"tiny-sd15": "tiny-sd15-adapter", "tiny-sdxl": "tiny-sdxl-adapter"}
DEFAULT_ADAPTERS: dict[tuple[Family, str], str] = {
    ("sd15", "canny"): ALIASES["sd15-canny-adapter"],
    ("sd15", "depth"): ALIASES["sd15-depth-adapter"],
    ("sd15", "plan-depth"): ALIASES["sd15-depth-adapter"],
    ("sdxl", "canny"): ALIASES["sdxl-canny-adapter"],
    ("sdxl", "depth"): ALIASES["sdxl-depth-adapter"],
    ("sdxl", "plan-depth"): ALIASES["sdxl-depth-adapter"],
}
"""T2I-Adapters (`profile.adapters`): SD 1.5 and SDXL only, run once per image instead of at every step."""
KINDS_WITH_ADAPTER: frozenset[str] = frozenset(kind for _, kind in DEFAULT_ADAPTERS)
ADAPTER_FAMILIES: frozenset[str] = frozenset({"sd15", "sdxl"})

IP_ADAPTERS: dict[str, tuple[str, str, str]] = {
    "tiny-sd15": ("tiny-ip-adapter", "ip-adapter.safetensors", "image_encoder"),
    "sd15": ("h94/IP-Adapter", "models/ip-adapter_sd15.safetensors", "models/image_encoder"),
    "sdxl": ("h94/IP-Adapter", "sdxl_models/ip-adapter_sdxl_vit-h.safetensors", "models/image_encoder"),
}
"""The IP-Adapter a style pack's mood board runs through, by tiny base or family: (model, weights file,
image encoder folder), in h94/IP-Adapter's layout (Apache-2.0; SDXL's ViT-H variant shares SD 1.5's encoder)."""


def ip_adapter(base: str, family: Family) -> tuple[str, str, str]:
    """The IP-Adapter for `base`; ValueError for families without one here (FLUX, SD 3)."""
    found = IP_ADAPTERS.get(base) or IP_ADAPTERS.get(family)
    if found is None:
        raise ValueError(f"a style pack's mood board runs through an SD 1.5 or SDXL IP-Adapter, not {family}")
    return found


UNION_MODES: dict[str, int] = {"depth": 1, "plan-depth": 1, "canny": 3, "tile": 6}
"""The ControlNet-Union (SDXL, xinsir) mode each kind of unit runs as: depth 1, canny/lineart 3, tile 6 (ProMax
checkpoints only)."""

SCHEDULERS = ("default", "unipc", "ddim", "euler", "euler_a", "dpmpp_2m", "pndm")
"""`default` keeps the base model's own scheduler class; the others replace it, keeping its betas."""

QUANTIZE_DEVICES: dict[str, tuple[str, ...]] = {"int8": ("cpu", "cuda")}
"""Each `quantize` mode, with the device types torchao's kernels for it run on."""

_MODEL_URL = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|file:///.*")
"""A published model's URL: an S3 bucket (its naming rules) and prefix, or a local file:/// folder."""

# The hub's repo-id rule, loosely: one slash, no path tricks; a stricter check is the hub's job.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", re.ASCII)


def is_preset(ref: str) -> bool:
    return ref in PRESETS


def is_hub_id(ref: str) -> bool:
    return ref not in PRESETS and ref not in ALIASES and bool(_HUB_ID.fullmatch(ref)) and ".." not in ref


def is_path(ref: str) -> bool:
    """A local folder reference: absolute, home-relative or explicitly relative (`./models/x`)."""
    return ref.startswith(("/", "~", "./", "../"))


def is_url(ref: str) -> bool:
    """A published model's URL (`shared.published`): s3://bucket/prefix or file:///abs/dir, no `..` in it."""
    return bool(_MODEL_URL.fullmatch(ref)) and ".." not in ref.split("/") and "\x00" not in ref


def check_ref(ref: str) -> str:
    """`ref` if it can name a model (preset, alias, hub id, folder path, published model's URL); ValueError
    otherwise."""
    if ref in PRESETS or ref in ALIASES or is_hub_id(ref) or (is_path(ref) and "\x00" not in ref) or is_url(ref):
        return ref
    raise ValueError(
        f"{ref[:60]!r} names no model: give a folder (absolute, or relative as ./runs/x), a hub id owner/name, the "
        "URL of a published model (s3://bucket/prefix, file:///abs/dir) or a preset such as sd15, sdxl or tiny-sd15 "
        "(docs/weights.md lists them)"
    )


_KNOWN_FAMILIES: dict[str, Family] = {
    "tiny-sd15": "sd15",
    "sd15": "sd15",
    "tiny-sdxl": "sdxl",
    "sdxl": "sdxl",
    "tiny-flux": "flux",
    "flux-dev": "flux",
    "tiny-flux-control": "flux-control",
    "flux-canny": "flux-control",
    "flux-depth": "flux-control",
    "tiny-sd3": "sd3",
    "sd35": "sd3",
    "stabilityai/stable-diffusion-3.5-medium": "sd3",
}
_KNOWN_FAMILIES.update({ALIASES[alias]: family for alias, family in list(_KNOWN_FAMILIES.items()) if alias in ALIASES})


def known_family(base: str) -> Family | None:
    """The family of a base known by name (presets, aliases and their hub ids); None when only its config can
    tell."""
    return _KNOWN_FAMILIES.get(base)


def default_controlnet(base: str, kind: str, family: Family, adapters: bool = False) -> str:
    """The ControlNet (with `adapters`, the T2I-Adapter) for control maps of `kind` that suits `base`, whose
    architecture is `family`.

    ValueError for kinds without a published default (`none`, `image`): such a unit must name its model. A FLUX
    Control base is its own control model: it takes the map as input channels.
    """
    if family == "flux-control":
        return base
    if adapters:
        found = TINY_ADAPTERS.get(base) or DEFAULT_ADAPTERS.get((family, kind))
        if found is None:
            raise ValueError(f"no default {kind!r} T2I-Adapter for base model {base!r}; name a model")
        return found
    if base in TINY_CONTROLNETS:
        return TINY_CONTROLNETS[base]
    try:
        return DEFAULT_CONTROLNETS[family, kind]
    except KeyError:
        raise ValueError(f"no default {kind!r} ControlNet for base model {base!r}; name a model") from None


def has_default_controlnet(base: str, kind: str, adapters: bool = False) -> bool:
    """Whether a unit of `kind` may leave out its model (true for every family alike, so no config is read)."""
    if adapters:
        return base in TINY_ADAPTERS or kind in KINDS_WITH_ADAPTER
    return base in TINY_CONTROLNETS or kind in KINDS_WITH_DEFAULT or known_family(base) == "flux-control"


def default_depth_model(base: str) -> str:
    """The DPT model for `depth` units: the tiny one for tiny bases (offline tests and demos), else DPT-Large."""
    return "tiny-dpt" if base in TINY_CONTROLNETS or base == "tiny-flux-control" else "Intel/dpt-large"
