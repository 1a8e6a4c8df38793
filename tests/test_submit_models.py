"""Model references checked where the job will run: on this machine for `archfarm render`, as a notice for a
farm (each worker reads its own disk), and never while a spec is merely parsed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from producer.models import pin_models
from shared.errors import InvalidInput
from shared.spec import Profile

TINY = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "controls": [{"kind": "canny"}]}


def profile(**changes: object) -> Profile:
    return Profile.model_validate({**TINY, **changes})


def test_presets_need_no_check() -> None:
    pinned, notices = pin_models(profile(), here=True)
    assert pinned == profile() and notices == []


def test_a_missing_folder_is_refused_here_and_noticed_for_a_farm(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-controlnet")
    unit = [{"kind": "canny", "model": missing}]
    with pytest.raises(InvalidInput, match=r"profile.controls.0.model: '.*no-such-controlnet' is not a folder on this"):
        pin_models(profile(controls=unit), here=True)
    pinned, notices = pin_models(profile(controls=unit), here=False)
    assert pinned.controls[0].model == missing
    assert notices == [
        f"profile.controls.0.model: {missing} is read from each worker's own disk; archfarm cannot check it"
    ]


def test_relative_folders_become_absolute_keeping_symlinks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "models").symlink_to(tmp_path / "real", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    pinned, _ = pin_models(profile(vae="./models"), here=True)
    assert pinned.vae == str(tmp_path / "models")  # the link a worker mounts, not where it points here


@pytest.mark.usefixtures("hub_offline")
def test_a_hub_model_must_be_cached_when_the_hub_is_off(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="someone/never-downloaded is not in the local Hugging Face cache"):
        pin_models(profile(base="someone/never-downloaded"), here=True)
    _, notices = pin_models(profile(base="someone/never-downloaded"), here=False)
    assert notices == []  # a farm's workers have caches of their own


def test_shared_imports_nothing_from_workers() -> None:
    """Validation is pure data: a producer or the API never pulls in the render engine, torch or diffusers."""
    probe = (
        "import sys, shared.spec, shared.registry, shared.broker, shared.db.store, shared.profiles, shared.limits;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'workers', 'torch', 'diffusers'}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
