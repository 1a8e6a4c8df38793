"""The cost model: GPU-seconds per image measured by workers per profile and device model, a prior until
then, and the work left in a job and in a pool."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from producer.client import Farm
from producer.submit import persist
from shared.config import Settings
from shared.db.costs import SMOOTHING, backlog, prior, record_cost, remaining
from shared.db.models import Cost
from shared.db.store import claim_task, finish_task
from shared.spec import Profile
from tests.test_db import JOB_ID, URGENT_ID, prepared

SDXL = {"base": "sdxl", "width": 1024, "height": 1024, "steps": 30, "controls": [{"kind": "canny"}]}


def test_the_prior_follows_the_family_the_size_the_steps_and_the_units() -> None:
    sd15 = Profile.model_validate({**SDXL, "base": "sd15", "width": 512, "height": 512, "steps": 20})
    sdxl, flux = Profile.model_validate(SDXL), Profile.model_validate({**SDXL, "base": "flux-dev", "steps": 28})
    assert 0.5 < prior(sd15) < 2 and 3 < prior(sdxl) < 8 and 10 < prior(flux) < 25
    longer = sdxl.model_copy(update={"steps": 60})
    assert prior(longer) == pytest.approx(2 * prior(sdxl))
    two_units = sdxl.model_copy(update={"controls": [*sdxl.controls, *sdxl.controls]})
    assert prior(two_units) == pytest.approx(1.25 * prior(sdxl))


def test_measures_average_per_device_and_a_jobs_work_left_uses_them_or_the_prior(
    sessions: sessionmaker[Session],
) -> None:
    measured = prepared(seeds=3)
    profile = measured.spec.profile
    slower = profile.model_copy(update={"steps": 40})  # another profile: nobody has measured it
    other = prepared(URGENT_ID, seeds=2)
    unmeasured = dataclasses.replace(
        other, spec=other.spec.model_copy(update={"profile": slower}), queue="archfarm.big"
    )
    with sessions.begin() as session:
        persist(session, measured)
        persist(session, unmeasured)
        record_cost(session, profile.digest(), "NVIDIA L4", 2.0)
        record_cost(session, profile.digest(), "NVIDIA L4", 4.0)
        record_cost(session, profile.digest(), "NVIDIA H100", 1.0)
    with sessions.begin() as session:
        l4 = session.get_one(Cost, (profile.digest(), "NVIDIA L4"))
        assert l4.samples == 2 and l4.seconds_per_image == pytest.approx(2.0 * (1 - SMOOTHING) + 4.0 * SMOOTHING)
        left = remaining(session)
        per_image = (l4.seconds_per_image + 1.0) / 2  # the mean over the devices that measured it
        assert left[JOB_ID].measured and left[JOB_ID].seconds == pytest.approx(3 * per_image)
        assert not left[URGENT_ID].measured and left[URGENT_ID].seconds == pytest.approx(2 * prior(slower))
        assert backlog(session) == pytest.approx({"archfarm": 3 * per_image, "archfarm.big": 2 * prior(slower)})
        for task in measured.tasks[:2]:
            claim_task(session, task.id, "w")  # running work is still work left
        finish_task(session, measured.tasks[0].id, "w")
        assert remaining(session, [JOB_ID])[JOB_ID].images == 2


def test_a_worker_records_what_each_image_cost_under_its_profile(
    embedded_settings: Settings, example_plan: Path
) -> None:
    job = {
        "plans": [str(example_plan)],
        "styles": ["modern"],
        "seeds": [1, 2, 3],
        "profile": {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "controls": [{"kind": "canny"}]},
    }
    with Farm(embedded_settings) as farm:
        job_id = farm.submit(job)
        assert farm.status(job_id).work_left_s is None  # done: nothing left
        with farm.sessions() as session:
            (cost,) = session.query(Cost).all()
    assert cost.profile_digest == Profile.model_validate(job["profile"]).digest()
    assert cost.device == "cpu" and cost.samples == 3 and 0 < cost.seconds_per_image < 60
