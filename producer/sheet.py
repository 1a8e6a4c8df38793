"""A job's contact sheet: rows are plan × style, columns are seeds; one grid for the dashboard and for the files
`archfarm sheet` writes (a PNG to mail or post, an HTML page with its images embedded, to open offline).

The grid is read a page at a time (`Farm.sheet`), so a 10,000-image job costs what its visible cells cost.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from producer.templating import ENV
from shared.errors import InvalidInput
from shared.thumbnails import THUMBNAIL_PX

if TYPE_CHECKING:
    from producer.views import ArtifactView

MAX_SHEET_PIXELS = 150_000_000
"""Largest PNG sheet drawn (about 450 MB of memory while it is drawn); an HTML sheet has no such limit."""


@dataclass(frozen=True)
class Cell:
    seed: int
    state: str
    """`rendered`, or its task's state while it has no image: `queued`, `running`, `failed`, `cancelled`."""
    artifact: ArtifactView | None = None
    """The image (a staged job's draft)."""
    final: ArtifactView | None = None
    """A staged job's final of this draft, once rendered."""
    first: ArtifactView | None = None
    """The image rendered with the cell's seed, where a re-roll that followed the plan better replaced it."""
    rerolls: int = 0
    """Re-rolls of the cell's image (`JobSpec.reroll`); the best of them all is `artifact`."""


@dataclass(frozen=True)
class Row:
    plan: str
    style: str
    cells: list[Cell]
    plan_digest: str = ""
    """The plan's content hash: the dashboard shows the plan beside its row by it."""

    @property
    def label(self) -> str:
        return f"{self.plan} / {self.style}"


@dataclass(frozen=True)
class Sheet:
    """One page of the grid: `rows` from `row_offset` of `rows_total`, the columns `seeds` from `seed_offset`
    of `seeds_total`."""

    job_id: str
    job_name: str
    seeds: list[int]
    rows: list[Row]
    row_offset: int
    rows_total: int
    seed_offset: int
    seeds_total: int
    picking: bool = False
    """A staged job that takes picks: its drafts can be chosen for finals."""
    consistency: dict[str, float] = field(default_factory=dict)
    """Each style's consistency score across its views (`shared.consistency`), where measured."""
    outliers: frozenset[int] = frozenset()
    """Images whose palette and texture stray from their style's other views."""
    palettes: dict[str, float] = field(default_factory=dict)
    """For styles with a pack's palette: their views' mean share of colour on it."""

    @property
    def artifacts(self) -> list[ArtifactView]:
        return [cell.artifact for row in self.rows for cell in row.cells if cell.artifact is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "seeds": self.seeds,
            "row_offset": self.row_offset,
            "rows_total": self.rows_total,
            "seed_offset": self.seed_offset,
            "seeds_total": self.seeds_total,
            "rows": [
                {
                    "plan": row.plan,
                    "plan_digest": row.plan_digest,
                    "style": row.style,
                    "consistency": self.consistency.get(row.style),
                    "palette": self.palettes.get(row.style),
                    "cells": [
                        {
                            "seed": c.seed,
                            "state": c.state,
                            "artifact": c.artifact.id if c.artifact else None,
                            "final": c.final.id if c.final else None,
                            "rerolls": c.rerolls,
                            "outlier": c.artifact is not None and c.artifact.id in self.outliers,
                        }
                        for c in row.cells
                    ],
                }
                for row in self.rows
            ],
        }


Read = Callable[["ArtifactView"], bytes]
"""An image's thumbnail bytes (`Farm.read(artifact, "thumbnail")`)."""


def write_sheet(sheet: Sheet, read: Read, path: Path, cell_px: int = THUMBNAIL_PX) -> int:
    """Write `sheet` as `path` (.png or .html); returns the images on it."""
    suffix = path.suffix.lower()
    if suffix not in (".png", ".html", ".htm"):
        raise InvalidInput(f"{path}: write a .png or an .html sheet")
    if suffix == ".png":
        largest = max((max(a.width, a.height) for a in sheet.artifacts), default=cell_px)
        cell_px = min(cell_px, largest)  # small images are not blown up into empty cells
        _check_size(sheet, cell_px)
    thumbnails = _read_all(sheet.artifacts, read)
    if suffix == ".png":
        image, info = sheet_png(sheet, thumbnails, cell_px)
        image.save(path, format="PNG", optimize=True, pnginfo=info)
    else:
        with path.open("w", encoding="utf-8") as out:
            for chunk in sheet_html(sheet, thumbnails):
                out.write(chunk)
    return len(thumbnails)


def _read_all(artifacts: list[ArtifactView], read: Read) -> dict[int, bytes]:
    """Every thumbnail, fetched a few at a time: object stores answer each request in milliseconds."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip((a.id for a in artifacts), pool.map(read, artifacts), strict=True))


_PAD = 8
_FONT_PX = 14


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=_FONT_PX)


def _layout(sheet: Sheet, cell_px: int) -> tuple[int, int, int, int]:
    """Label column width, header height and the whole sheet's size."""
    font = _font()
    label_w = max([int(font.getlength(row.label)) for row in sheet.rows] + [60]) + 2 * _PAD
    header_h = 2 * (_FONT_PX + _PAD) + _PAD
    width = label_w + len(sheet.seeds) * (cell_px + _PAD) + _PAD
    height = header_h + len(sheet.rows) * (cell_px + _PAD) + _PAD
    return label_w, header_h, width, height


def _check_size(sheet: Sheet, cell_px: int) -> None:
    _, _, width, height = _layout(sheet, cell_px)
    if width * height > MAX_SHEET_PIXELS:
        raise InvalidInput(
            f"a PNG sheet of this job would be {width}×{height} pixels, over {MAX_SHEET_PIXELS:,}: use a smaller "
            "--cell or write an .html sheet"
        )


def sheet_png(
    sheet: Sheet, thumbnails: dict[int, bytes], cell_px: int = THUMBNAIL_PX
) -> tuple[Image.Image, PngImagePlugin.PngInfo]:
    """The grid drawn with its labels (job, plan / style per row, seed per column), and PNG text chunks that
    name the same rows and seeds for programs."""
    font = _font()
    label_w, header_h, width, height = _layout(sheet, cell_px)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((_PAD, _PAD), f"{sheet.job_name}  {sheet.job_id}", fill="black", font=font)
    top = header_h - _FONT_PX - _PAD
    for column, seed in enumerate(sheet.seeds):
        x = label_w + column * (cell_px + _PAD) + cell_px // 2
        draw.text((x, top), f"seed {seed}", fill="black", font=font, anchor="ma")
    for index, row in enumerate(sheet.rows):
        y = header_h + index * (cell_px + _PAD)
        draw.text((_PAD, y + cell_px // 2), row.label, fill="black", font=font, anchor="lm")
        for column, cell in enumerate(row.cells):
            x = label_w + column * (cell_px + _PAD)
            if cell.artifact is None:
                draw.rectangle((x, y, x + cell_px - 1, y + cell_px - 1), fill="#eeeeee")
                draw.text((x + _PAD, y + _PAD), cell.state, fill="#777777", font=font)
                continue
            with Image.open(io.BytesIO(thumbnails[cell.artifact.id])) as thumb:
                small = thumb.convert("RGB")
            small.thumbnail((cell_px, cell_px), Image.Resampling.LANCZOS)
            image.paste(small, (x + (cell_px - small.width) // 2, y + (cell_px - small.height) // 2))
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", f"archfarm contact sheet: {sheet.job_name} ({sheet.job_id})")
    info.add_text(
        "archfarm.sheet",
        json.dumps({"job": sheet.job_id, "rows": [row.label for row in sheet.rows], "seeds": sheet.seeds}),
    )
    return image, info


def sheet_html(sheet: Sheet, thumbnails: dict[int, bytes]) -> Iterable[str]:
    """A standalone page: the dashboard's grid with each thumbnail inlined as a data: URL."""

    def src(artifact: ArtifactView) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(thumbnails[artifact.id]).decode()

    return ENV.get_template("sheet_file.html").generate(sheet=sheet, src=src, href=None)
