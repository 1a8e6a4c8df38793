"""Checking a profile's model references where the job will run, at submit.

Validation (`shared.spec`) only knows names. Whether a folder or a hub id can be loaded depends on the
machine that renders: checked here when that is this machine (`archfarm render`, `Farm` without a broker),
default ControlNets and depth models included; on a farm, where each worker reads its own disk and cache,
said in a notice instead of guessed. A model published to storage is read here in every case, and pinned.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from shared import hub, published
from shared.config import Settings
from shared.errors import InvalidInput, StorageError
from shared.licences import Use, check_use, declared, licence_of
from shared.published import manifest_digest
from shared.registry import ALIASES, PRESETS, default_controlnet, default_depth_model, is_path, is_url, known_family
from shared.spec import ControlUnit, DepthControl, JobSpec, Profile


def pin_models(profile: Profile, *, here: bool, relative: bool = True) -> tuple[Profile, list[str]]:
    """The profile with every local folder made absolute (a worker started elsewhere finds the same path),
    and notices for what cannot be known from here. Raises InvalidInput for a model that cannot load here
    when the job renders here.

    `relative`: whether a bare name that is a folder of this process's working folder names that folder (the
    CLI's convenience); False for the REST API, where `owner/name` is a hub id whatever this disk holds."""
    notices: list[str] = []

    def pin(field: str, ref: str, config: str) -> str:
        folder = Path(ref).expanduser()
        if ref in PRESETS or is_url(ref):  # a published model is checked by `pin_published`
            return ref
        if is_path(ref) or (relative and ref not in ALIASES and folder.is_dir()):
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
    if profile.union is not None:
        updates["union"] = pin("profile.union", profile.union, "config.json")
    if profile.vae is not None:
        updates["vae"] = pin("profile.vae", profile.vae, "config.json")
    units = []
    family = known_family(profile.base)
    for index, unit in enumerate(profile.controls):
        field = f"profile.controls.{index}"
        changes: dict[str, str] = {}
        if unit.model is not None:
            changes["model"] = pin(f"{field}.model", unit.model, "config.json")
        elif here and family is not None and profile.union is None:  # a default is implicit, but must load here
            pin(
                f"{field}.model (default)",
                default_controlnet(profile.base, unit.kind, family, profile.adapters),
                "config.json",
            )
        if isinstance(unit, DepthControl) and unit.depth_model is not None:
            changes["depth_model"] = pin(f"{field}.depth_model", unit.depth_model, "config.json")
        elif isinstance(unit, DepthControl) and here:
            pin(f"{field}.depth_model (default)", default_depth_model(profile.base), "config.json")
        units.append(unit.model_copy(update=changes))
    updates["controls"] = units
    return profile.model_copy(update=updates), notices


def pin_published(profile: Profile, settings: Settings) -> Profile:
    """The profile with each ControlNet named by URL pinned to its manifest's hash (`model_sha256`), read now:
    the hash is part of the profile's digest, so a model published again under the same URL never overwrites
    earlier outputs, and no worker renders the job with another version. A pin the spec already carries (a
    re-render) must still hold."""
    units = []
    for index, unit in enumerate(profile.controls):
        if unit.model is not None and is_url(unit.model):
            field = f"profile.controls.{index}.model"
            try:
                digest = manifest_digest(unit.model, settings)
            except (InvalidInput, StorageError) as error:
                raise InvalidInput(f"{field}: {error}") from None
            if unit.model_sha256 not in (None, digest):
                raise InvalidInput(f"{field}: the model at {unit.model} was published again since the job pinned it")
            unit = unit.model_copy(update={"model_sha256": digest})
        units.append(unit)
    return profile.model_copy(update={"controls": units})


def _check_cached(field: str, repo_id: str, config: str, notices: list[str]) -> None:
    """A hub model must be in the local Hugging Face cache when the hub cannot be reached (HF_HUB_OFFLINE, or
    no answer to a short probe): refused now, not after the hub library's retries at render time."""
    if hub.cached(repo_id, config):
        return
    reason = hub.unavailable(repo_id)
    if reason is not None:
        raise InvalidInput(f"{field}: {reason}")
    notices.append(f"{field}: {repo_id} is not in the local Hugging Face cache; it is downloaded on first use")


def check_licences(spec: JobSpec, use: Use, settings: Settings) -> list[str]:
    """Notices about the licences of every model the job renders with, defaults included (`shared.licences`);
    InvalidInput for one whose licence forbids the job's use. A local folder or a published model is the
    studio's own (trained, or copied in), checked only when it declares a licence in its `archfarm-model.json`
    (a folder read where it can be: here)."""
    notices: list[str] = []
    more = [] if spec.upscale is None else [("upscale.control", spec.upscale.control)]
    for field, ref in every_model(spec.profile, more):
        try:
            if is_url(ref):
                licence = declared(published.declaration(ref, settings), f"{field} ({ref})")
            elif is_path(ref):
                licence = declared(published.local_declaration(Path(ref).expanduser()), f"{field} ({ref})")
            else:
                licence = licence_of(ref)
            if licence is None and (is_url(ref) or is_path(ref)):
                continue
            notice = check_use(field, ALIASES.get(ref, ref), licence, use)
        except ValueError as error:
            raise InvalidInput(str(error)) from None
        if notice is not None:
            notices.append(notice)
    return notices


def every_model(profile: Profile, more: Sequence[tuple[str, ControlUnit]] = ()) -> list[tuple[str, str]]:
    """(field, reference) of each model a profile loads (and `more` units of a job, e.g. an upscale's tile
    unit): named ones, and the defaults of units naming none where the base's family is known by name (one of
    another base is read from its config by the worker)."""
    family = known_family(profile.base)
    found = [("profile.base", profile.base)] + ([("profile.vae", profile.vae)] if profile.vae else [])
    found += [("profile.union", profile.union)] if profile.union else []
    for field, unit in [(f"profile.controls.{i}", unit) for i, unit in enumerate(profile.controls)] + list(more):
        if unit.model is not None:
            found.append((f"{field}.model", unit.model))
        elif family is not None and profile.union is None:  # a union serves every unit, an upscale's too
            found.append(
                (f"{field}.model (default)", default_controlnet(profile.base, unit.kind, family, profile.adapters))
            )
        if isinstance(unit, DepthControl):
            found.append((f"{field}.depth_model", unit.depth_model or default_depth_model(profile.base)))
    return found
