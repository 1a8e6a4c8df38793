"""Memory classes: a stack's size known from its configs before it loads, and tasks only claimed by a worker
whose device can hold their stack."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from producer.client import Farm
from shared.db.status import JobStatus
from workers.engine.footprint import stack_bytes
from workers.engine.models import ModelCache, module_bytes
from workers.engine.presets import resolve

PROFILE = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "controls": [{"kind": "canny"}]}


@pytest.mark.parametrize(("base", "controlnet"), [("tiny-sd15", "tiny-canny"), ("tiny-sdxl", "tiny-sdxl-controlnet")])
def test_a_stack_is_sized_from_its_configs_as_it_holds_once_loaded(
    models_dir: Path, base: str, controlnet: str
) -> None:
    estimate = stack_bytes(resolve(base, models_dir), [resolve(controlnet, models_dir)], None, torch.float32)
    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    modules = [m for m in cache.base(base).values() if isinstance(m, torch.nn.Module)]
    loaded = sum(module_bytes(m) for m in modules) + module_bytes(cache.controlnet(controlnet))
    assert abs(estimate - loaded) / loaded < 0.001, (estimate, loaded)
    half = stack_bytes(resolve(base, models_dir), [resolve(controlnet, models_dir)], None, torch.float16)
    assert half * 2 == estimate  # counted at the dtype it runs in


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.s3
@pytest.mark.slow
def test_a_worker_too_small_for_a_stack_never_claims_it_and_one_that_can_renders_it(
    farm: Farm, farm_env: dict[str, str], start_workers, example_plan: Path
) -> None:
    """A worker whose device offers 1 MiB (the tiny stack holds 6 MiB) alone: the job fails at once, saying
    what the stack needs and what the largest worker offers. A large worker joins and the job is retried:
    every task is rendered by the large one, the small one handing each on."""
    from sqlalchemy import select

    from shared.db.models import Task

    farm_env["ARCHFARM_DEVICE_MEMORY_GB"] = str(1 / 1024)
    start_workers("cpu:1")
    job = {"plans": [str(example_plan)], "styles": ["modern", "japandi"], "seeds": {"count": 3}, "profile": PROFILE}
    job_id = farm.submit(job)
    view = farm.wait(job_id, timeout=120)
    assert view.status is JobStatus.FAILED and view.counts["failed"] == 6
    assert "its model stack needs 0.01 GiB; the largest worker of queue" in view.failures[0].error
    assert "offers 0.00 GiB" in view.failures[0].error
    (worker,) = [w for w in farm.workers() if w.state == "live"]
    assert worker.memory_gib == pytest.approx(1 / 1024)

    del farm_env["ARCHFARM_DEVICE_MEMORY_GB"]
    start_workers("cpu:1")
    farm.retry(job_id)
    assert farm.wait(job_id, timeout=180).status is JobStatus.SUCCEEDED
    with farm.sessions() as session:
        rendered_by = set(session.scalars(select(Task.worker).where(Task.job_id == job_id)))
    large = next(w for w in farm.workers() if w.state == "live" and w.memory_gib and w.memory_gib > 1)
    assert rendered_by == {large.id} and worker.id != large.id
