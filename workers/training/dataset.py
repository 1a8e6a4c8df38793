"""Training pairs in the layout of diffusers' `examples/controlnet/train_controlnet.py`: a folder or storage
prefix holding `metadata.jsonl`, one row per pair `{"image", "conditioning_image", "text"}` with file names
relative to it.

A bad row (a missing or unreadable file, images of different sizes, an empty prompt) is reported by `check`
with its row number, and during training skipped and counted: a run that has taken hours does not end on
one broken file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from shared.config import Settings
from shared.errors import ArchfarmError, InvalidInput
from shared.images import decode_image
from shared.storage import Storage, open_storage_from_settings

if TYPE_CHECKING:
    import torch

METADATA = "metadata.jsonl"
COLUMNS = ("image", "conditioning_image", "text")
MAX_ROWS = 10_000_000


@dataclass(frozen=True)
class Row:
    number: int
    """1-based line of metadata.jsonl, as a user finds it in an editor."""
    image: str
    conditioning_image: str
    text: str


@dataclass(frozen=True)
class Problem:
    row: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.reason}"


@dataclass(frozen=True)
class Pair:
    """One decoded row, as tensors at the training resolution: image in [-1, 1], control map in [0, 1]."""

    image: torch.Tensor
    conditioning: torch.Tensor
    text: str


class Dataset:
    """A dataset's rows (read once) and its files (read per use), from a folder or an s3:// prefix."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url
        self.settings = settings
        self._storage: Storage | None = None
        self.rows, self.problems = _parse(self.storage.get(METADATA) if self._has_metadata() else b"", url)

    @property
    def storage(self) -> Storage:
        # Opened lazily: a dataset is pickled into data-loader processes, each opening its own client.
        if self._storage is None:
            self._storage = open_storage_from_settings(self.settings, self.url)
        return self._storage

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_storage": None}

    def _has_metadata(self) -> bool:
        try:
            if self.storage.exists(METADATA):
                return True
        except ArchfarmError as error:
            raise InvalidInput(f"dataset {self.url}: {error}") from None
        raise InvalidInput(f"dataset {self.url}: no {METADATA} (one JSON row per pair: {', '.join(COLUMNS)})")

    def images(self, row: Row) -> tuple[Image.Image, Image.Image]:
        """The row's image and control map, decoded; InvalidInput (naming the row) when either is bad."""
        image = self._image(row, row.image)
        conditioning = self._image(row, row.conditioning_image)
        if image.size != conditioning.size:
            raise InvalidInput(
                f"image is {image.width}×{image.height}, its control map {conditioning.width}×"
                f"{conditioning.height}: a pair must be aligned pixel for pixel"
            )
        if not row.text.strip():
            raise InvalidInput("empty prompt")
        return image, conditioning

    def pair(self, row: Row, resolution: int) -> Pair:
        image, conditioning = self.images(row)
        return Pair(_tensor(image, resolution) * 2 - 1, _tensor(conditioning, resolution), row.text)

    def check(self) -> Iterator[Problem]:
        """Every problem, row by row: metadata rows that do not parse, then files that do not load."""
        yield from self.problems
        for row in self.rows:
            try:
                self.images(row)
            except ArchfarmError as error:
                yield Problem(row.number, str(error))

    def _image(self, row: Row, name: str) -> Image.Image:
        try:
            data = self.storage.get(name)
        except (FileNotFoundError, KeyError):
            raise InvalidInput(f"{name}: no such file") from None
        except ArchfarmError as error:
            raise InvalidInput(f"{name}: {error}") from None
        return decode_image(data, name, max_pixels=self.settings.max_image_pixels)


def _parse(data: bytes, url: str) -> tuple[list[Row], list[Problem]]:
    rows: list[Row] = []
    problems: list[Problem] = []
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        if number > MAX_ROWS:
            raise InvalidInput(f"dataset {url}: more than {MAX_ROWS} rows")
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as error:
            problems.append(Problem(number, f"not JSON ({error.msg})"))
            continue
        if not isinstance(fields, dict) or not all(isinstance(fields.get(c), str) for c in COLUMNS):
            problems.append(Problem(number, f"needs string fields {', '.join(COLUMNS)}"))
            continue
        rows.append(Row(number, fields["image"], fields["conditioning_image"], fields["text"]))
    return rows, problems


def _tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """CHW float in [0, 1]: shorter side scaled to `resolution`, then the centre cropped square (as diffusers'
    script does), the same for both images of a pair so they stay aligned."""
    scale = resolution / min(image.size)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    import torch  # here, not at the top: the API checks datasets on submit and never loads torch

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
