"""Checking a profile's model references where the job will run, at submit.

Validation (`shared.spec`) only knows names. Whether a folder or a hub id can be loaded depends on the
machine that renders: checked here when that is this machine (`archfarm render`, `Farm` without a broker);
on a farm, where each worker reads its own disk and cache, said in a notice instead of guessed.
"""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub.constants
from huggingface_hub import try_to_load_from_cache

from shared.errors import InvalidInput
from shared.registry import ALIASES, PRESETS, is_path
from shared.spec import DepthControl, Profile


def pin_models(profile: Profile, *, here: bool) -> tuple[Profile, list[str]]:
    """The profile with every local folder made absolute (a worker started elsewhere finds the same path),
    and notices for what cannot be known from here. Raises InvalidInput for a model that cannot load here
    when the job renders here."""
    notices: list[str] = []

    def pin(field: str, ref: str, config: str) -> str:
        folder = Path(ref).expanduser()
        if ref in PRESETS:
            return ref
        if is_path(ref) or (ref not in ALIASES and folder.is_dir()):
            # Absolute, symlinks kept: the link is what workers mount, not where it points on this machine.
            absolute = Path(os.path.abspath(folder))
            if here and not absolute.is_dir():
                raise InvalidInput(f"{field}: {ref!r} is not a folder on this machine")
            if not here:
                notices.append(f"{field}: {absolute} is read from each worker's own disk; archfarm cannot check it")
            return str(absolute)
        if here:
            _check_cached(field, ALIASES.get(ref, ref), config, notices)
        return ref

    updates: dict[str, object] = {"base": pin("profile.base", profile.base, "model_index.json")}
    if profile.vae is not None:
        updates["vae"] = pin("profile.vae", profile.vae, "config.json")
    units = []
    for index, unit in enumerate(profile.controls):
        changes: dict[str, str] = {}
        if unit.model is not None:
            changes["model"] = pin(f"profile.controls.{index}.model", unit.model, "config.json")
        if isinstance(unit, DepthControl) and unit.depth_model is not None:
            changes["depth_model"] = pin(f"profile.controls.{index}.depth_model", unit.depth_model, "config.json")
        units.append(unit.model_copy(update=changes))
    updates["controls"] = units
    return profile.model_copy(update=updates), notices


def _check_cached(field: str, repo_id: str, config: str, notices: list[str]) -> None:
    """A hub model must be in the local Hugging Face cache when the hub cannot be reached."""
    if isinstance(try_to_load_from_cache(repo_id, config), str):
        return
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise InvalidInput(f"{field}: {repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    notices.append(f"{field}: {repo_id} is not in the local Hugging Face cache; it is downloaded on first use")
