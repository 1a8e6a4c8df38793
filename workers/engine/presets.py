"""The model registry: every name a job may use for a model, mapped to something `from_pretrained` loads.

Four kinds of reference, tried in this order: a tiny preset (built offline into the models folder on first
use), a short alias for a published model (its hub id), an existing local folder, a hub id `owner/name`
(diffusers then reads the local Hugging Face cache or the hub).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from shared.errors import InvalidInput, ModelError
from workers.engine.family import Family, family

# Builders are imported on first use: validating a job must not pull in torch and diffusers.
FORMAT_VERSION = 2
"""Part of each preset's folder name (`tiny-sd15-v1`): bump it when a builder changes, so stale builds are
not reused."""


def _lazy(module: str, builder: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        getattr(importlib.import_module(module), builder)(folder)

    return build


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-sd15": _lazy("workers.engine.tiny", "build_sd15"),
    "tiny-canny": _lazy("workers.engine.tiny", "build_canny"),
    "tiny-sdxl": _lazy("workers.engine.tiny_sdxl", "build_sdxl"),
    "tiny-sdxl-controlnet": _lazy("workers.engine.tiny_sdxl", "build_controlnet"),
    "tiny-dpt": _lazy("workers.preprocessors.tiny_dpt", "build_dpt"),
}
PRESET_NAMES: frozenset[str] = frozenset(BUILDERS)

ALIASES: dict[str, str] = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd15-canny": "lllyasviel/sd-controlnet-canny",
    "sd15-depth": "lllyasviel/sd-controlnet-depth",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-canny": "diffusers/controlnet-canny-sdxl-1.0",
    "sdxl-depth": "diffusers/controlnet-depth-sdxl-1.0",
}

# A tiny base is a test and demo stand-in: its one tiny ControlNet serves every kind of control map.
_TINY_CONTROLNETS: dict[str, str] = {"tiny-sd15": "tiny-canny", "tiny-sdxl": "tiny-sdxl-controlnet"}
# Families of the published bases that have aliases, known without reading their configs.
_KNOWN_FAMILIES: dict[str, Family] = {"sd15": "sd15", ALIASES["sd15"]: "sd15", "sdxl": "sdxl", ALIASES["sdxl"]: "sdxl"}
_DEFAULT_CONTROLNETS: dict[tuple[Family, str], str] = {
    ("sd15", "canny"): ALIASES["sd15-canny"],
    ("sd15", "depth"): ALIASES["sd15-depth"],
    ("sd15", "plan-depth"): ALIASES["sd15-depth"],
    ("sdxl", "canny"): ALIASES["sdxl-canny"],
    ("sdxl", "depth"): ALIASES["sdxl-depth"],
    ("sdxl", "plan-depth"): ALIASES["sdxl-depth"],
}

# The hub's repo-id rule, loosely: one slash, no path tricks; a stricter check is the hub's job.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", re.ASCII)


def check_ref(ref: str) -> str:
    """`ref` if it can name a model (preset, alias, local folder, hub id); ValueError otherwise.

    Cheap and offline: the producer calls it while validating a job, before anything is queued.
    """
    if ref in BUILDERS or ref in ALIASES or Path(ref).expanduser().is_dir() or _HUB_ID.fullmatch(ref):
        return ref
    known = ", ".join(sorted([*BUILDERS, *ALIASES]))
    raise ValueError(f"{ref!r} is neither a preset ({known}), a local folder, nor a hub id `owner/name`")


def resolve(ref: str, models_dir: Path) -> str:
    """Where `from_pretrained` should load `ref` from: a local folder's absolute path, or a hub id."""
    try:
        check_ref(ref)
    except ValueError as e:
        raise ModelError(f"unknown model: {e}") from None
    if ref in BUILDERS:
        return str(_ensure_built(ref, models_dir))
    if ref in ALIASES:
        return ALIASES[ref]
    folder = Path(ref).expanduser()
    return str(folder.resolve()) if folder.is_dir() else ref


def default_controlnet(base: str, kind: str) -> str:
    """The ControlNet for control maps of `kind` (e.g. "canny") that suits base model `base`, as a reference.

    A real base's family comes from its config (`family`). One whose config cannot be read counts as SD 1.5:
    loading it fails the render anyway, with the error that says why.
    """
    if base in _TINY_CONTROLNETS:
        return _TINY_CONTROLNETS[base]
    try:
        return _DEFAULT_CONTROLNETS[_base_family(base), kind]
    except KeyError:
        raise InvalidInput(f"no default {kind!r} ControlNet for base model {base!r}; name a model") from None


def default_depth_model(base: str) -> str:
    """The DPT model for `depth` units: the tiny one for tiny bases (offline tests and demos), else DPT-Large."""
    return "tiny-dpt" if base in _TINY_CONTROLNETS else "Intel/dpt-large"


def _base_family(base: str) -> Family:
    if base in _KNOWN_FAMILIES:
        return _KNOWN_FAMILIES[base]
    folder = Path(base).expanduser()
    try:
        return family(str(folder.resolve()) if folder.is_dir() else base)
    except ModelError:
        return "sd15"


def _ensure_built(name: str, models_dir: Path) -> Path:
    """The preset's folder, built on first use.

    Worker processes may race to build the same preset: each builds into its own temporary folder and
    renames it into place. The rename is atomic, so a reader never sees a half-written folder; a loser's
    rename fails because the target exists, and it throws its copy away (builds are deterministic).
    """
    target = models_dir / f"{name}-v{FORMAT_VERSION}"
    if target.is_dir():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    # Inside models_dir so the rename stays on one filesystem; a dot keeps it out of listings.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=models_dir))
    try:
        BUILDERS[name](staging)
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
