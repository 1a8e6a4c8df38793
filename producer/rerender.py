"""Re-rendering an image from its sidecar: same plan bytes, models, settings, seed batch and scheduler.

On a CPU the result is bitwise identical; on a GPU it is as close as the kernels' determinism allows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producer.local import render_local
from shared.config import Settings
from shared.errors import InvalidInput, NotFound
from shared.spec import JobSpec, parse_model


@dataclass(frozen=True)
class Rerendered:
    image: Path
    model_changes: list[str]
    """Models whose weights differ from the ones the sidecar recorded (the image may then differ too)."""
    shared_call: int
    """Other tasks the original shared its pipeline call with: the re-render (alone) matches it within 1/255,
    not bitwise, when there were any."""


def rerender(sidecar_path: Path, out_dir: Path, settings: Settings) -> Rerendered:
    meta = _read(sidecar_path)
    spec = parse_model(
        JobSpec,
        {
            "name": "rerender",
            "plans": [meta["plan"]["url"]],
            "styles": [meta["style"]],
            "seeds": meta["batch_seeds"],
            "profile": meta["profile"],
            "output": str(out_dir.resolve()),
        },
        str(sidecar_path),
    )
    report = render_local(spec, settings)
    # Matched by file name: the seed and digest name the image whatever folder the plan's name gives it
    # (a plan staged by a farm is re-read from its content-addressed copy, with another name).
    found = sorted(out_dir.rglob(Path(meta["key"]).name))
    image = found[0] if found else out_dir / meta["key"]
    if not report.ok or not image.exists():
        # The key is derived from the plan's content and every setting: a different key means changed inputs.
        problems = "; ".join(report.errors.values()) or "the plan or a control image changed since"
        raise InvalidInput(f"{sidecar_path}: cannot reproduce {meta['key']}: {problems}")
    fresh = json.loads(image.with_suffix(".json").read_text())
    return Rerendered(
        image=image,
        model_changes=_changed_models(meta["models"], fresh["models"]),
        shared_call=meta.get("call", {}).get("tasks", 1) - 1,
    )


def _read(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInput(f"{path}: not a sidecar ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != "archfarm.sidecar/1":
        raise InvalidInput(f"{path}: not an archfarm sidecar (no format archfarm.sidecar/1)")
    return meta


def _changed_models(recorded: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    pairs = [(recorded["base"], fresh["base"]), *zip(recorded["controlnets"], fresh["controlnets"], strict=False)]
    return [old["name"] for old, new in pairs if old.get("sha256") != new.get("sha256")]
