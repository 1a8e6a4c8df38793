"""The training spec: how to train a ControlNet, validated like a job before anything runs or is queued.

A job of kind `train` (`kind: train` in a document `archfarm submit` takes; `archfarm train` takes nothing
else). Pure data: validating one reads no disk and imports no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from shared.errors import InvalidInput
from shared.registry import check_ref
from shared.spec import (
    MAX_SEED,
    ModelRef,
    Name,
    References,
    _digest,
    _relative_to,
    _Strict,
    load_document,
    parse_model,
)

_URL_SCHEMES = ("file://", "s3://")
MODEL = "controlnet"
"""The trained ControlNet's place under a run's output, published there (`shared.published`) when it ends."""
MAX_STEPS = 10_000_000

Location = Annotated[str, Field(min_length=1, max_length=2048)]


def _check_location(value: str) -> str:
    if "://" in value and not value.startswith(_URL_SCHEMES):
        raise ValueError(f"{value!r}: unsupported URL scheme (use a path, file:// or s3://)")
    return value


class Validation(_Strict):
    """Images rendered with the farm's own engine from the ControlNet being trained, every `every` steps, on
    fixed prompts and control maps (already maps: what a dataset's `conditioning_image` holds), so runs can
    be compared by eye as they go."""

    every: int = Field(500, ge=1, le=MAX_STEPS)
    prompts: list[Annotated[str, Field(min_length=1, max_length=2000)]] = Field(min_length=1, max_length=16)
    images: list[Location] = Field(min_length=1, max_length=16, description="control maps; path, file:// or s3://")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    steps: int = Field(20, ge=1, le=150)
    guidance_scale: float = Field(7.5, ge=0.0, le=30.0)

    @field_validator("images")
    @classmethod
    def _images(cls, images: list[str]) -> list[str]:
        return [_check_location(image) for image in images]

    @model_validator(mode="after")
    def _pairs(self) -> Validation:
        if len(self.images) not in (1, len(self.prompts)):
            raise ValueError(f"{len(self.images)} images for {len(self.prompts)} prompts: give one, or one per prompt")
        return self


class Training(_Strict):
    """What a run trains and how: a ControlNet beside a frozen base, on (image, control map, prompt) pairs; or,
    `target: lora`, a LoRA of the base's UNet on the same pairs' images and prompts (a style pack's look)."""

    target: Literal["controlnet", "lora"] = Field(
        "controlnet", description="controlnet; or lora: a UNet LoRA for a style pack (`archfarm styles add --lora`)"
    )
    rank: int = Field(16, ge=1, le=128, description="a LoRA's rank")
    base: ModelRef = Field(description="the base model the ControlNet will steer (preset, alias, hub id, folder)")
    init: ModelRef = Field(
        "base", description="`base`: a fresh ControlNet copied from the base's UNet; or a ControlNet to go on from"
    )
    dataset: Location = Field(description="folder, file:// or s3:// prefix holding metadata.jsonl")
    resolution: int = Field(512, ge=64, le=2048)
    batch_size: int = Field(4, ge=1, le=512, description="pairs per device and micro-batch")
    gradient_accumulation: int = Field(1, ge=1, le=1024)
    learning_rate: float = Field(1e-5, gt=0.0, le=1.0)
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    max_steps: int = Field(ge=1, le=MAX_STEPS, description="optimiser steps")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto: fp16 on CUDA, none on a CPU; the ControlNet keeps fp32 master weights"
    )
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(1e-2, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0, le=1e6)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    empty_prompts: float = Field(
        0.0, ge=0.0, le=1.0, description="share of pairs trained with an empty prompt (classifier-free guidance)"
    )
    timesteps: list[Annotated[int, Field(ge=0, le=999)]] | None = Field(
        None,
        max_length=1000,
        description="train only at these noise timesteps (say, those a short sampler visits); default: all",
    )
    checkpoint_every: int = Field(500, ge=1, le=MAX_STEPS)
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="the latest N checkpoints are kept")
    validation: Validation | None = None
    report_to: Literal["csv", "tensorboard"] = Field("csv", description="metrics.csv, or TensorBoard event files")
    dataloader_workers: int = Field(0, ge=0, le=64, description="processes decoding images beside the training one")

    @field_validator("base", "init")
    @classmethod
    def _refs(cls, ref: str) -> str:
        return ref if ref == "base" else check_ref(ref)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, dataset: str) -> str:
        return _check_location(dataset)

    @model_validator(mode="after")
    def _lora_starts_fresh(self) -> Training:
        if self.target == "lora" and self.init != "base":
            raise ValueError("init: a LoRA starts from the base (its up-projections zero); leave init: base")
        return self

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"{value} is not a multiple of 8")
        return value


_OPERATIONAL = {"max_steps", "checkpoint_every", "keep_checkpoints", "validation", "report_to", "dataloader_workers"}


class TrainingSpec(_Strict):
    """A training job: its name, where the result and checkpoints go, and on a farm which workers run it."""

    kind: Literal["train"] = "train"
    name: Name = "controlnet"
    train: Training
    output: Location = Field(description="folder, file:// or s3:// prefix for checkpoints, validation and the model")
    pool: Name = Field("train", description="the workers that run it: `archfarm worker --pool NAME` (default train)")
    priority: int = Field(50, ge=0, le=100)

    @field_validator("output")
    @classmethod
    def _output(cls, output: str) -> str:
        return _check_location(output)

    @classmethod
    def from_document(cls, data: Any, source: str = "", folder: Path | None = None) -> TrainingSpec:
        """Validate a loaded document; relative paths in it are taken relative to `folder` (the file's)."""
        if not isinstance(data, dict):
            raise InvalidInput(f"{source}: expected a mapping of training fields")
        if folder is not None:
            data = _paths_relative_to(data, folder)
        spec: TrainingSpec = parse_model(cls, data, source)
        return spec

    def digest(self) -> str:
        """Content hash of what decides the weights step by step: a run may be resumed with more steps, other
        intervals or validation, never with another dataset, model or optimiser setting."""
        unset = {"target", "rank"} if self.train.target == "controlnet" else set()  # older runs keep their digest
        return _digest(self.train.model_dump(mode="json", exclude=_OPERATIONAL | unset))

    def references(self) -> References:
        train = self.train
        urls = [("train.dataset", train.dataset), ("output", self.output)]
        if train.validation is not None:
            urls += [(f"train.validation.images.{i}", image) for i, image in enumerate(train.validation.images)]
        models = [("train.base", train.base)] + ([("train.init", train.init)] if train.init != "base" else [])
        return References(urls, models)


def model_url(output: str) -> str:
    """Where a run writing to `output` publishes its ControlNet: what a render profile's `model:` names."""
    return output.rstrip("/") + "/" + MODEL


def load_training(path: Path) -> TrainingSpec:
    """A training spec file (YAML or JSON), for `archfarm train`: `kind` may be left out there."""
    return TrainingSpec.from_document(load_document(path), str(path), path.parent)


def _paths_relative_to(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    data = dict(data)
    train = data.get("train")
    if isinstance(train, dict):
        train = dict(train)
        for key in ("init", "base"):  # a bare `owner/name` is a hub id: only ./ and ../ mark a folder
            if isinstance(train.get(key), str) and train[key].startswith(("./", "../")):
                train[key] = str(folder / train[key])
        if "dataset" in train:
            train["dataset"] = _relative_to(train["dataset"], folder)
        validation = train.get("validation")
        if isinstance(validation, dict) and isinstance(validation.get("images"), list):
            validation = {**validation, "images": [_relative_to(i, folder) for i in validation["images"]]}
            train["validation"] = validation
        data["train"] = train
    if "output" in data:
        data["output"] = _relative_to(data["output"], folder)
    return data
