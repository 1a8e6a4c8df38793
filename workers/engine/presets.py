"""The model registry: every name a job may use for a model, mapped to something `from_pretrained` loads.

Four kinds of reference, tried in this order: a tiny preset (built offline into the models folder on first
use), a short alias for a published model (its hub id), an existing local folder, a hub id `owner/name`
(diffusers then reads the local Hugging Face cache or the hub).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from shared.errors import InvalidInput, ModelError

# Builders are imported on first use: validating a job must not pull in torch and diffusers.
FORMAT_VERSION = 2
"""Part of each preset's folder name (`tiny-sd15-v1`): bump it when a builder changes, so stale builds are
not reused."""


def _lazy(builder: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        from workers.engine import tiny

        getattr(tiny, builder)(folder)

    return build


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-sd15": _lazy("build_sd15"),
    "tiny-canny": _lazy("build_canny"),
}
PRESET_NAMES: frozenset[str] = frozenset(BUILDERS)

ALIASES: dict[str, str] = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd15-canny": "lllyasviel/sd-controlnet-canny",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sdxl-canny": "diffusers/controlnet-canny-sdxl-1.0",
}

# Which base family a reference belongs to; anything not listed is taken to be SD 1.5-compatible.
_FAMILIES: dict[str, str] = {
    "tiny-sd15": "tiny-sd15",
    "sdxl": "sdxl",
    ALIASES["sdxl"]: "sdxl",
}
_DEFAULT_CONTROLNETS: dict[tuple[str, str], str] = {
    ("tiny-sd15", "canny"): "tiny-canny",
    ("sd15", "canny"): ALIASES["sd15-canny"],
    ("sdxl", "canny"): ALIASES["sdxl-canny"],
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
    """The ControlNet of `kind` (e.g. "canny") that suits base model `base`, as a reference for `resolve`."""
    family = _FAMILIES.get(base, "sd15")
    try:
        return _DEFAULT_CONTROLNETS[family, kind]
    except KeyError:
        raise InvalidInput(f"no default {kind!r} ControlNet for base model {base!r}; name one") from None


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
