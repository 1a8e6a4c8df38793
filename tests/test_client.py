"""The Python API without a broker: jobs render in this process, and models stay loaded between jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.client import Farm
from shared.config import Settings
from shared.db.status import JobStatus

PROFILE = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "controls": [{"kind": "canny"}]}


@pytest.mark.slow
def test_embedded_submits_render_and_keep_models_resident(tmp_path: Path, models_dir: Path, example_plan: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'a.db'}",
        models_dir=models_dir,
        broker_url=None,
        storage_url=str(tmp_path / "renders"),
    )
    with Farm(settings) as farm:
        ids = [
            farm.submit({"plans": [str(example_plan)], "styles": [style], "seeds": [1, 2], "profile": PROFILE})
            for style in ("modern", "japandi")
        ]
        assert [farm.status(i).status for i in ids] == [JobStatus.SUCCEEDED, JobStatus.SUCCEEDED]
        assert len(farm.results(ids[1])) == 2
        renderer = farm._embedded.lifecycle.renderer  # type: ignore[union-attr]
        loads = renderer.cache.loads  # type: ignore[union-attr]
        assert sum(loads.values()) == 2  # base + ControlNet, once for both jobs
        written = farm.download(ids[0], tmp_path / "copy")
    assert sorted(p.suffix for p in written) == [".json", ".json", ".png", ".png"]
