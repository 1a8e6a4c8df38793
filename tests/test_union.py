"""SDXL ControlNet-Union: one network serving every unit of a profile as one of its modes, in one pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.errors import InvalidInput
from shared.profiles import BUILTIN
from shared.spec import JobSpec, Profile
from tests.models_fixture import PLAN_A, PLAN_B
from workers.engine.models import ModelCache

UNION = {"base": "tiny-sdxl", "union": "tiny-sdxl-union", "width": 64, "height": 64, "steps": 4}


def _render(cache: ModelCache, modes: tuple[int, ...], maps: list[tuple], seeds=(1,)) -> list[np.ndarray]:  # type: ignore[no-untyped-def, type-arg]
    from workers.engine.pipeline import Item, Request, Unit, render_batch

    request = Request(
        base="tiny-sdxl",
        units=[Unit("tiny-sdxl-union", 1.0, 0.0, 1.0) for _ in modes],
        items=[Item("a bright living room", "blurry", seed, item) for seed, item in zip(seeds, maps, strict=True)],
        steps=4,
        guidance_scale=7.5,
        width=64,
        height=64,
        modes=modes,
        output_type="np",
    )
    return list(render_batch(cache, request).images)


@pytest.mark.slow
def test_a_unions_modes_steer_it_and_a_batch_matches_each_image_alone(model_cache: ModelCache) -> None:
    """Two modes differ from one, and the same map differs by the mode it runs as; two items of different maps
    in one call are each within 1/255 of their render alone."""
    (canny,) = _render(model_cache, (3,), [(PLAN_A,)])
    (depth,) = _render(model_cache, (1,), [(PLAN_A,)])
    (both,) = _render(model_cache, (3, 1), [(PLAN_A, PLAN_B)])
    assert np.abs(canny - depth).max() > 1 / 255 and np.abs(canny - both).max() > 1 / 255
    batch = _render(model_cache, (3, 1), [(PLAN_A, PLAN_B), (PLAN_B, PLAN_A)], seeds=(1, 2))
    (alone,) = _render(model_cache, (3, 1), [(PLAN_B, PLAN_A)], seeds=(2,))
    assert np.abs(batch[0] - both).max() <= 1 / 255 and np.abs(batch[1] - alone).max() <= 1 / 255


def test_a_union_serves_sdxl_units_of_its_modes_alone() -> None:
    def profile(**changes: object) -> Profile:
        return Profile.model_validate({**UNION, "controls": [{"kind": "canny"}], **changes})

    assert profile().union == "tiny-sdxl-union"
    with pytest.raises(ValueError, match="made for SDXL, not 'tiny-sd15'"):
        profile(base="tiny-sd15")
    with pytest.raises(ValueError, match="the union serves every unit; name no model"):
        profile(controls=[{"kind": "canny", "model": "tiny-sdxl-controlnet"}])
    with pytest.raises(ValueError, match="a union has no 'none' mode"):
        profile(controls=[{"kind": "none"}])
    # A profile naming no union keeps the digest (and so the output keys) it had before unions existed.
    old = Profile.model_validate(BUILTIN["tiny-sdxl"]).digest()
    assert old == "dbe36cb032c2a57f63fc4eec183934521e5d0ad8f2a5b6152b0a70f6fe3fe240" != profile().digest()


def test_a_union_profile_names_its_network_once_and_is_checked_at_submit(tmp_path: Path, example_plan: Path) -> None:
    from producer.submit import prepare
    from shared.config import Settings

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'state.db'}", storage_url=str(tmp_path / "out"))
    job = {"plans": [str(example_plan)], "styles": ["modern"], "seeds": [1]}
    ok = prepare(JobSpec.from_document({**job, "profile": "sdxl-union-archviz"}), settings, farm=True)
    assert ok.spec.profile.union == "sdxl-union" and ok.spec.use == "commercial"  # xinsir's union: Apache-2.0
    flux = {**UNION, "union": "black-forest-labs/FLUX.1-dev", "controls": [{"kind": "canny"}]}
    with pytest.raises(InvalidInput, match="profile.union: black-forest-labs/FLUX.1-dev is under the FLUX.1"):
        prepare(JobSpec.from_document({**job, "profile": flux}), settings, farm=True)
