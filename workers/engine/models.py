"""Models resident in a worker process: each loaded once with `from_pretrained`, then reused by every render.

Loading costs seconds and compiling minutes, against well under a second per image (PERF.md), so a worker
keeps what it has loaded for its whole life; routing work by model stack keeps that set small. Nothing here
touches CUDA at import: a worker initialises it itself after it starts, since CUDA does not survive fork.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, StableDiffusionPipeline
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from shared.errors import InvalidInput, ModelError
from workers.engine.presets import resolve

# What a base model contributes to a ControlNet pipeline; its safety checker and feature extractor are
# never loaded (renders of floor plans are not screened, and it would cost memory and a download).
BASE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


def pick_device(setting: str) -> torch.device:
    """The torch device for a `device` setting: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N"."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise InvalidInput(f"device {setting!r} is not one of auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InvalidInput(f"device {setting!r} is not one of auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"device {setting!r} asked for, but CUDA is not available here")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on GPUs (SD 1.5 holds up in half precision, at twice the speed); float32 on CPUs."""
    return torch.float16 if device.type == "cuda" else torch.float32


class ModelCache:
    """One per worker process: base pipelines' components and ControlNets, loaded once each and kept.

    `loads` and `hits` count, per resolved location, how often a model was read from storage or served from
    memory, so callers and tests can see that a repeated stack loads nothing.
    """

    def __init__(self, models_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.models_dir = models_dir
        self.device = device
        self.dtype = dtype
        self.loads: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.swaps = 0
        self._last_stack: tuple[str, ...] | None = None
        self._bases: dict[str, dict[str, Any]] = {}
        self._controlnets: dict[str, ControlNetModel] = {}
        self._identities: dict[str, dict[str, str | None]] = {}

    def base(self, ref: str) -> dict[str, Any]:
        """The base model's pipeline components (`BASE_COMPONENTS`), on this cache's device and dtype.

        Callers must not mutate the scheduler: it is shared; build a fresh one from its config per call.
        """
        location = resolve(ref, self.models_dir)
        if location in self._bases:
            self.hits[location] += 1
            return self._bases[location]
        # The dtype goes to from_pretrained, not to `.to()`: loading in it keeps modules a model marks as
        # float32-only in float32, which a later cast would not (diffusers warns on every such cast).
        with _load_errors(ref, location):
            pipe = StableDiffusionPipeline.from_pretrained(
                location,
                dtype=self.dtype,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        pipe.to(self.device)
        components = {name: pipe.components[name] for name in BASE_COMPONENTS}
        self._bases[location] = components
        self.loads[location] += 1
        return components

    def controlnet(self, ref: str) -> ControlNetModel:
        """The ControlNet, on this cache's device and dtype."""
        location = resolve(ref, self.models_dir)
        if location in self._controlnets:
            self.hits[location] += 1
            return self._controlnets[location]
        with _load_errors(ref, location):
            controlnet = ControlNetModel.from_pretrained(location, dtype=self.dtype)
        controlnet.to(self.device)
        self._controlnets[location] = controlnet
        self.loads[location] += 1
        return controlnet

    def note_stack(self, stack: tuple[str, ...]) -> None:
        """Count a swap whenever a render uses another model stack than the one before: the number that
        routing work by stack keeps low."""
        if self._last_stack is not None and stack != self._last_stack:
            self.swaps += 1
        self._last_stack = stack

    def resident(self) -> list[str]:
        """Locations of every model held in memory, for the worker's heartbeat row."""
        return [*self._bases, *self._controlnets]

    def identity(self, ref: str) -> dict[str, str | None]:
        """What exactly `ref` names, for recording next to each result.

        A local folder (presets included) is identified by the sha256 of its weight files, a hub model by
        the commit of its locally cached snapshot (None when it is not cached yet).
        """
        if ref not in self._identities:
            location = resolve(ref, self.models_dir)
            local = Path(location).is_dir()
            self._identities[ref] = {
                "name": ref,
                "location": location,
                "sha256": weights_sha256(Path(location)) if local else None,
                "revision": None if local else _cached_revision(location),
            }
        return self._identities[ref]


def weights_sha256(folder: Path) -> str:
    """sha256 over a model folder's safetensors files and their relative paths, in a fixed order.

    Configs are left out on purpose: they carry library versions, which change without the model changing.
    """
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _cached_revision(repo_id: str) -> str | None:
    try:
        snapshot = snapshot_download(repo_id, local_files_only=True)
    except LocalEntryNotFoundError:
        return None
    return Path(snapshot).name  # the hub cache names each snapshot folder by its commit


@contextmanager
def _load_errors(ref: str, location: str) -> Iterator[None]:
    """Turn from_pretrained's many failure types into one ModelError naming the reference."""
    try:
        yield
    # Missing folders and hub misses are OSError; a folder holding the wrong kind of model is ValueError.
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelError(f"cannot load model {ref!r} from {location}: {reason}") from error
