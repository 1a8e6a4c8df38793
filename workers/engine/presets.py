"""Model references (`shared.registry`) mapped to something `from_pretrained` loads on this machine.

A tiny preset is built offline into the models folder on first use; an alias becomes its hub id; a folder
becomes its absolute path; a hub id is left to diffusers (the local Hugging Face cache, or the hub).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from shared.errors import ModelError
from shared.folders import built_once
from shared.registry import ALIASES, PRESETS, Family, is_hub_id, is_path, known_family
from workers.engine.family import family

# Builders are imported on first use: validating a job must not pull in torch and diffusers.
FORMAT_VERSION = 4
"""Part of each preset's folder name (`tiny-sd15-v1`): bump it when a builder changes, so stale builds are
not reused."""


def _lazy(module: str, builder: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        getattr(importlib.import_module(module), builder)(folder)

    return build


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-sd15": _lazy("workers.engine.tiny", "build_sd15"),
    "tiny-canny": _lazy("workers.engine.tiny", "build_canny"),
    "tiny-plan": _lazy("workers.engine.tiny", "build_plan"),
    "tiny-sdxl": _lazy("workers.engine.tiny_sdxl", "build_sdxl"),
    "tiny-sdxl-controlnet": _lazy("workers.engine.tiny_sdxl", "build_controlnet"),
    "tiny-sdxl-union": _lazy("workers.engine.tiny_sdxl", "build_union"),
    "tiny-dpt": _lazy("workers.preprocessors.tiny_dpt", "build_dpt"),
    "tiny-flux": _lazy("workers.engine.tiny_dit", "build_flux"),
    "tiny-flux-controlnet": _lazy("workers.engine.tiny_dit", "build_flux_controlnet"),
    "tiny-flux-control": _lazy("workers.engine.tiny_dit", "build_flux_control"),
    "tiny-sd3": _lazy("workers.engine.tiny_dit", "build_sd3"),
    "tiny-sd3-controlnet": _lazy("workers.engine.tiny_dit", "build_sd3_controlnet"),
    "tiny-sd15-adapter": _lazy("workers.engine.tiny", "build_adapter"),
    "tiny-sdxl-adapter": _lazy("workers.engine.tiny_sdxl", "build_adapter"),
    "tiny-ip-adapter": _lazy("workers.engine.tiny", "build_ip_adapter"),
}
if frozenset(BUILDERS) != PRESETS:  # the registry in shared/ names them; this module builds them
    raise RuntimeError("workers.engine.presets.BUILDERS out of step with shared.registry.PRESETS")


def resolve(ref: str, models_dir: Path) -> str:
    """Where `from_pretrained` should load `ref` from: a local folder's absolute path, or a hub id.

    The job was validated at submit; this only maps the name. A folder missing here stays a path, so
    loading it fails with a `ModelError` that names this machine's view of it. Only a path is a folder (submit
    made the CLI's bare relative folders absolute): a bare `owner/name` is a hub id, whatever folder of that
    name lies where this worker runs.
    """
    if ref in BUILDERS:
        return str(_ensure_built(ref, models_dir))
    if ref in ALIASES:
        return ALIASES[ref]
    if is_path(ref):
        try:
            return str(Path(ref).expanduser().resolve())
        except (OSError, RuntimeError) as error:  # a symlink loop, a path too long
            raise ModelError(f"cannot load model {ref!r}: {error}") from None
    if not is_hub_id(ref):
        raise ModelError(f"unknown model {ref!r}")
    return ref


def base_family(location: str) -> Family:
    """The family of a base at `location` (as `resolve` gives it): known by name, else read from its config."""
    return known_family(location) or family(location)


def _ensure_built(name: str, models_dir: Path) -> Path:
    """The preset's folder, built on first use; worker processes racing to build it get one whole copy (builds
    are deterministic, so the loser's is the same and thrown away)."""
    return built_once(models_dir / f"{name}-v{FORMAT_VERSION}", BUILDERS[name])
