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


def test_a_failed_training_jobs_status_lists_its_failure(tmp_path: Path) -> None:
    """A training task names no plan, style or seeds: its failure is listed with its reason all the same."""
    from producer.training import prepare_training
    from shared.db.store import fail_task
    from shared.training import TrainingSpec
    from workers.training.synthetic import write_boxes

    write_boxes(tmp_path / "data", 2, 64)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'state.db'}")
    spec = TrainingSpec.model_validate(
        {
            "train": {"base": "tiny-sd15", "dataset": str(tmp_path / "data"), "resolution": 64, "max_steps": 2},
            "output": str(tmp_path / "out"),
        }
    )
    with pytest.warns(UserWarning), Farm(settings) as farm:
        prepared = prepare_training(spec, settings)
        with farm.sessions.begin() as session:
            prepared.persist(session)
            fail_task(session, prepared.task_id, None, "dataset gone")
        view = farm.status(prepared.id)
    assert view.status is JobStatus.FAILED and view.training is not None
    assert [(f.task, f.plan, f.style, f.seeds, f.error) for f in view.failures] == [
        (prepared.task_id, "", "", "", "dataset gone")
    ]
    assert [(g.plan, g.error, g.count) for g in view.failure_groups] == [("", "dataset gone", 1)]
