"""The JSON written beside every image: enough to reproduce it and to audit where it came from. Written by the
worker that renders it, read by the dashboard (an image's details) and `archfarm rerender`, one model for all."""

from __future__ import annotations

import platform
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT: Literal["archfarm.sidecar/1"] = "archfarm.sidecar/1"
_PACKAGES = (
    "archfarm",
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "numpy",
    "pillow",
    "opencv-python-headless",
)


@cache
def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


class ModelIdentity(BaseModel):
    """A model as it was loaded: its reference, where from, and a hash of its weights where one is known."""

    model_config = ConfigDict(extra="allow")

    name: str = ""
    sha256: str | None = None


class Models(BaseModel):
    model_config = ConfigDict(extra="allow")

    base: ModelIdentity = Field(default_factory=ModelIdentity)
    controlnets: list[ModelIdentity] = Field(default_factory=list)
    vae: ModelIdentity | None = None
    ip_adapter: ModelIdentity | None = None
    """The IP-Adapter a style pack's mood board ran through."""


class PlanRecord(BaseModel):
    name: str = ""
    url: str
    sha256: str


class SourceRecord(BaseModel):
    """The image a final was rendered from (its picked draft), or an upscale's tile: enlarged and rendered again
    at `strength` (`artifact`: none for an upscale of an image from elsewhere)."""

    artifact: int | None
    url: str
    sha256: str
    strength: float


class Rerender(BaseModel):
    """Written by `archfarm rerender` into the new image's sidecar: what it reproduced, and how closely."""

    of: str = Field(description="the original's sidecar")
    image: str = Field(description="the image this sidecar describes")
    identical: bool
    max_difference: int | None = Field(None, description="largest difference of any channel, of 255")
    pixels_differing: int | None = None
    pixels: int | None = None


class Sidecar(BaseModel):
    """One image's record. Unknown fields are kept (a newer archfarm's sidecar reads back whole)."""

    model_config = ConfigDict(extra="allow")

    format: Literal["archfarm.sidecar/1"] = FORMAT
    job: dict[str, Any]
    task: str
    key: str
    batch_seeds: list[int] = Field(
        description="the task's seeds, rendered together: a re-render repeats them, bitwise the same on a CPU "
        "when the call held this task alone (`call`), within 1/255 when it shared the call with other tasks"
    )
    call: dict[str, int] = Field(default_factory=lambda: {"images": 1, "tasks": 1})
    plan: PlanRecord
    stage: str | None = Field(None, description="a staged job's pass: draft or final")
    source: SourceRecord | None = Field(None, description="a final's draft: its lineage, and what a re-render reads")
    adherence: float | None = Field(None, description="how well the image's edges follow its first control map (0-1)")
    revision: dict[str, Any] | None = Field(
        None,
        description="a revision's parent image and mask (the job's `revise`): its lineage, and what a re-render reads",
    )
    upscale: dict[str, Any] | None = Field(
        None, description="an upscale's image and grid (the job's `upscale`): what a tile's re-render reads"
    )
    tile: int | None = Field(None, description="which tile of the upscale's grid the image is")
    tiles: list[dict[str, Any]] | None = Field(
        None, description="an assembled upscale's lineage: each tile's index, artifact and URL"
    )
    seam: float | None = Field(None, description="an assembled upscale's seam score (1: no seam shows)")
    style: dict[str, Any]
    seed: int
    profile: dict[str, Any]
    models: Models
    scheduler: dict[str, Any] = Field(default_factory=dict)
    device: str = ""
    threads: int | None = Field(
        None, description="CPU kernels split their sums over this many threads: the same count reproduces bitwise"
    )
    image_sha256: str
    versions: dict[str, str] = Field(default_factory=library_versions)
    timings: dict[str, float] = Field(default_factory=dict)
    rerender: Rerender | None = None

    @property
    def shared_call(self) -> int:
        """Other tasks the image shared its pipeline call with."""
        return self.call.get("tasks", 1) - 1
