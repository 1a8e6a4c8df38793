"""Licences: a commercial job never renders with weights whose licence forbids it; conditions and unknown
licences are said at submit; every image's sidecar names its models' licences."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from PIL import Image

from producer.submit import prepare
from shared.config import Settings
from shared.errors import InvalidInput, SubmitWarning
from shared.spec import JobSpec

PROFILE = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "controls": [{"kind": "canny"}]}


def _job(example_plan: Path, **changes: object) -> JobSpec:
    document = {"plans": [str(example_plan)], "styles": ["modern"], "seeds": [1], "profile": PROFILE, **changes}
    return JobSpec.from_document(document)


def _settings(tmp_path: Path, **changes: object) -> Settings:
    return Settings(database_url=f"sqlite:///{tmp_path / 'state.db'}", storage_url=str(tmp_path / "out"), **changes)


def test_a_commercial_job_naming_non_commercial_weights_is_refused_in_one_line(
    tmp_path: Path, example_plan: Path
) -> None:
    flux_net = {**PROFILE, "controls": [{"kind": "canny", "model": "InstantX/FLUX.1-dev-Controlnet-Union"}]}
    with pytest.raises(InvalidInput) as refused:
        prepare(_job(example_plan, profile=flux_net), _settings(tmp_path), farm=True)
    message = str(refused.value)
    assert "\n" not in message and message.startswith("profile.controls.0.model: InstantX/FLUX.1-dev-Controlnet-Union")
    assert "FLUX.1 [dev] Non-Commercial License" in message and "forbids commercial use" in message
    with pytest.raises(InvalidInput, match="profile.base: black-forest-labs/FLUX.1-dev is under the FLUX.1"):
        prepare(
            _job(example_plan, profile={**PROFILE, "base": "black-forest-labs/FLUX.1-dev"}),
            _settings(tmp_path),
            farm=True,
        )
    assert not (tmp_path / "state.db").exists() and not (tmp_path / "out").exists()

    # Declared non-commercial, by the job or by the farm: accepted, and the use is recorded with the job.
    allowed = prepare(_job(example_plan, profile=flux_net, use="non-commercial"), _settings(tmp_path), farm=True)
    assert allowed.spec.use == "non-commercial"
    farm_default = prepare(_job(example_plan, profile=flux_net), _settings(tmp_path, use="non-commercial"), farm=True)
    assert farm_default.spec.use == "non-commercial"
    assert prepare(_job(example_plan), _settings(tmp_path)).spec.use == "commercial"


def test_conditional_and_unknown_licences_are_notices(tmp_path: Path, example_plan: Path) -> None:
    sd35_net = {
        **PROFILE,
        "controls": [{"kind": "canny", "model": "stabilityai/stable-diffusion-3.5-large-controlnet-canny"}],
    }
    unknown = {**PROFILE, "controls": [{"kind": "canny", "model": "someone/own-controlnet"}]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare(_job(example_plan, profile=sd35_net), _settings(tmp_path), farm=True)
        prepare(_job(example_plan, profile=unknown), _settings(tmp_path), farm=True)
        prepare(_job(example_plan, profile=unknown, use="non-commercial"), _settings(tmp_path), farm=True)
    notices = [str(w.message) for w in caught if issubclass(w.category, SubmitWarning)]
    assert notices == [
        "profile.controls.0.model: stabilityai/stable-diffusion-3.5-large-controlnet-canny is under the Stability AI "
        "Community License: free for commercial use only by organisations under US$1M annual revenue",
        "profile.controls.0.model: the licence of someone/own-controlnet is not known to archfarm; check that it "
        "allows commercial use",
    ]


def test_an_upscales_default_tile_controlnet_is_checked_too(tmp_path: Path, example_plan: Path) -> None:
    image = tmp_path / "image.png"
    Image.new("RGB", (64, 64), "white").save(image)
    flux_tile = {"image": str(image), "scale": 8, "tile": 128, "control": {"model": "black-forest-labs/FLUX.1-dev"}}
    with pytest.raises(InvalidInput, match="upscale.control.model: black-forest-labs/FLUX.1-dev is under"):
        prepare(_job(example_plan, upscale=flux_tile), _settings(tmp_path), farm=True)


@pytest.mark.slow
def test_every_sidecar_names_its_models_licences(tmp_path: Path, models_dir: Path, example_plan: Path) -> None:
    from producer.client import Farm

    settings = _settings(tmp_path, models_dir=models_dir, broker_url=None)
    with Farm(settings) as farm:
        (image,) = farm.results(farm.submit(_job(example_plan)))
    sidecar = json.loads(Path(image.sidecar_url.removeprefix("file://")).read_text())
    assert sidecar["models"]["base"]["licence"] == "Apache-2.0"
    assert [net["licence"] for net in sidecar["models"]["controlnets"]] == ["Apache-2.0"]


def test_a_local_or_published_model_is_checked_against_the_licence_it_declares(
    tmp_path: Path, models_dir: Path, example_plan: Path
) -> None:
    """A studio's folder declaring FLUX.1 [dev]'s licence in archfarm-model.json refuses a commercial job, as a
    model published with that licence does; one declaring nothing is taken as the studio's own; a key archfarm
    does not know is refused rather than taken for none. The declaration travels with the published version to
    each worker, whose sidecars record it."""
    import shutil

    from shared import published
    from workers.engine.presets import resolve
    from workers.renderer import Renderer

    folder = tmp_path / "studio-net"
    shutil.copytree(resolve("tiny-canny", models_dir), folder)
    settings = _settings(tmp_path, models_dir=models_dir)
    local = {**PROFILE, "controls": [{"kind": "canny", "model": str(folder)}]}
    assert prepare(_job(example_plan, profile=local), settings).spec.use == "commercial"  # the studio's own

    (folder / "archfarm-model.json").write_text(json.dumps({"licence": "flux-1-dev-non-commercial-license"}))
    with pytest.raises(InvalidInput, match=r"profile.controls.0.model: .*studio-net is under the FLUX.1 \[dev\] Non"):
        prepare(_job(example_plan, profile=local), settings)
    assert prepare(_job(example_plan, profile=local, use="non-commercial"), settings).spec.use == "non-commercial"
    (folder / "archfarm-model.json").write_text(json.dumps({"licence": "do-what-you-like"}))
    with pytest.raises(InvalidInput, match="declares licence 'do-what-you-like'; known: apache-2.0"):
        prepare(_job(example_plan, profile=local), settings)

    url = (tmp_path / "published").as_uri()
    (folder / "archfarm-model.json").unlink()
    published.publish(folder, url, settings, licence="stabilityai-ai-community")
    by_url = {**PROFILE, "controls": [{"kind": "canny", "model": url}]}
    with pytest.warns(SubmitWarning, match="is under the Stability AI Community License: free for commercial use"):
        pinned = prepare(_job(example_plan, profile=by_url), settings).spec.profile
    renderer = Renderer(settings)
    renderer.cache.pin(url, pinned.controls[0].model_sha256)
    assert renderer._identity(url)["licence"] == "Stability AI Community License"
