"""ControlNets named by URL (`shared.published`): published to storage with a manifest of hashes, pinned at
submit, fetched once per worker model cache and checked file by file, on the real S3 server and a local folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from producer.local import Embedded
from producer.remote import check_remote
from producer.submit import prepare
from shared.config import Settings
from shared.errors import InvalidInput, ModelError
from shared.published import MANIFEST, fetch, publish
from shared.spec import JobSpec, Profile
from shared.storage import S3Storage
from workers.engine.models import ModelCache
from workers.engine.presets import resolve
from workers.lifecycle import classify
from workers.policy import ErrorKind


@pytest.fixture
def cache_dir(models_dir: Path, tmp_path: Path) -> Path:
    """A model cache of this test's own (fetched models land here), the session's built presets linked in."""
    folder = tmp_path / "models"
    folder.mkdir()
    for preset in models_dir.iterdir():
        (folder / preset.name).symlink_to(preset)
    return folder


@pytest.fixture
def canny(models_dir: Path) -> Path:
    return Path(resolve("tiny-canny", models_dir))


def settings_for(tmp_path: Path, models: Path, s3: Any = None) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        models_dir=models,
        storage_url=str(tmp_path / "renders"),
        s3_endpoint_url=s3.endpoint_url if s3 else None,
        s3_region=s3.region if s3 else None,
    )


def job(plan: Path, model: str, out: Path) -> JobSpec:
    profile = {"width": 64, "height": 64, "steps": 1, "controls": [{"kind": "canny", "model": model}]}
    return JobSpec.model_validate(
        {"plans": [str(plan)], "styles": ["modern"], "seeds": [1], "profile": profile, "output": str(out)}
    )


def leftovers(models: Path) -> list[str]:
    """What a fetch left in the model cache besides the linked presets."""
    return sorted(p.name for p in models.iterdir() if not p.is_symlink())


@pytest.mark.slow
def test_a_controlnet_by_s3_url_renders_pinned_and_is_fetched_once(  # type: ignore[no-untyped-def]
    s3_server,
    s3_bucket: str,
    canny: Path,
    cache_dir: Path,
    tmp_path: Path,
    example_plan: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_for(tmp_path, cache_dir, s3_server)
    url = f"s3://{s3_bucket}/nets/canny/"
    first = publish(canny, url, settings)
    changed = tmp_path / "changed"
    shutil.copytree(canny, changed)
    (changed / "notes.txt").write_text("trained for another epoch")
    embedded = Embedded(settings)
    try:
        # Published again between submit and render: the job fails for good, nothing half-fetched stays behind.
        report = embedded.render(
            job(example_plan, url, tmp_path / "a"), on_prepared=lambda _: publish(changed, url, settings)
        )
        assert not report.ok
        assert "changed after the job was submitted" in next(iter(report.errors.values()))
        assert leftovers(cache_dir) == []
        report = embedded.render(job(example_plan, url, tmp_path / "b"))
    finally:
        embedded.close()
    assert report.ok
    (side,) = (tmp_path / "b").rglob("*.json")
    meta = json.loads(side.read_text())
    second = meta["profile"]["controls"][0]["model_sha256"]
    assert second != first
    (net,) = meta["models"]["controlnets"]
    assert net["name"] == url and net["manifest_sha256"] == second
    assert net["location"] == str(cache_dir / f"published-{second}")
    assert sorted(p.name for p in Path(net["location"]).iterdir()) == [
        "archfarm-model.json",  # the version's manifest, with what it declares
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "notes.txt",
    ]

    gets: list[str] = []
    real_get = S3Storage.get

    def counted(storage: S3Storage, key: str) -> bytes:
        gets.append(key)
        return real_get(storage, key)

    monkeypatch.setattr(S3Storage, "get", counted)
    fresh = ModelCache(cache_dir, torch.device("cpu"), torch.float32, settings=settings)  # another worker process
    fresh.pin(url, second)
    fresh.controlnet(url)
    identity = {k: v for k, v in fresh.identity(url).items() if v is not None}  # the sidecar leaves out what is None
    assert identity == net and gets == []  # loaded from the model cache: nothing downloaded


def test_a_local_published_model_is_fetched_once_and_checked_file_by_file(canny: Path, tmp_path: Path) -> None:
    settings = settings_for(tmp_path, tmp_path / "models")
    store = tmp_path / "store"
    digest = publish(canny, str(store), settings)
    assert publish(canny, store.as_uri() + "/", settings) == digest  # the same files: the same version
    manifest = json.loads((store / MANIFEST).read_text())
    assert manifest["format"] == 1 and sorted(manifest["files"]) == sorted(p.name for p in canny.iterdir())

    fetched = fetch(store.as_uri(), tmp_path / "models", settings, digest)
    assert fetched.name == f"published-{digest}"
    files = {p.name: p.read_bytes() for p in fetched.iterdir()}
    assert files.pop("archfarm-model.json") == (store / "archfarm-model.json").read_bytes()  # its manifest, kept
    assert files == {p.name: p.read_bytes() for p in canny.iterdir()}

    weights = store / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")  # damaged in storage after publishing
    assert fetch(store.as_uri(), tmp_path / "models", settings, digest) == fetched  # fetched once: not read again
    with pytest.raises(ModelError, match=r"diffusion_pytorch_model.safetensors does not match its sha256 in"):
        fetch(store.as_uri(), tmp_path / "fresh", settings, digest)
    assert list((tmp_path / "fresh").iterdir()) == []  # no half-written folder left

    with pytest.raises(ModelError, match="the model at .* changed after the job was submitted") as error:
        fetch(store.as_uri(), tmp_path / "fresh", settings, "0" * 64)  # the job pinned another version
    assert classify(error.value) is ErrorKind.PERMANENT


def test_a_url_without_a_manifest_is_refused_at_submit_with_one_line(tmp_path: Path, example_plan: Path) -> None:
    settings = settings_for(tmp_path, tmp_path / "models")
    (tmp_path / "half").mkdir()
    with pytest.raises(InvalidInput) as error:
        prepare(job(example_plan, (tmp_path / "half").as_uri(), tmp_path / "out"), settings)
    assert str(error.value) == (
        f"profile.controls.0.model: no {MANIFEST} under {(tmp_path / 'half').as_uri()}: not a published model"
    )
    (tmp_path / "half" / MANIFEST).write_text('{"format": 2}')
    with pytest.raises(InvalidInput, match=f"{MANIFEST} is not a format 1 manifest"):
        prepare(job(example_plan, (tmp_path / "half").as_uri(), tmp_path / "out"), settings)


@pytest.mark.parametrize(
    "names",
    [
        ["../escape"],
        ["/etc/passwd"],
        ["a/../../escape"],
        ["a//b"],
        [".hidden"],
        ["a\\b"],
        [MANIFEST],
        ["x\nconfig.json"],
        ["a", "a/b"],  # a file and a folder of one name
    ],
)
def test_path_tricks_in_a_manifest_are_refused(names: list[str], tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / MANIFEST).write_text(json.dumps({"format": 1, "files": dict.fromkeys(names, "0" * 64)}))
    with pytest.raises(ModelError, match="names an unsafe path"):
        fetch(store.as_uri(), tmp_path / "models", settings_for(tmp_path, tmp_path / "models"), None)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "models").exists()


def test_only_controlnets_take_urls_and_the_pin_is_in_the_digest() -> None:
    unit = {"kind": "canny", "model": "s3://models/canny"}
    pinned = Profile.model_validate({"controls": [{**unit, "model_sha256": "a" * 64}]})
    assert pinned.digest() != Profile.model_validate({"controls": [{**unit, "model_sha256": "b" * 64}]}).digest()
    bad = [
        ({"controls": [{"kind": "canny", "model": "https://example.com/canny"}]}, "names no model"),
        ({"base": "s3://models/base", "controls": [{"kind": "canny"}]}, "only a ControlNet"),
        ({"controls": [{"kind": "canny", "model": "s3://models/../etc"}]}, "names no model"),
        ({"controls": [{"kind": "canny", "model_sha256": "a" * 64}]}, "model_sha256 pins a model named by URL"),
    ]
    for profile, message in bad:
        with pytest.raises(ValueError, match=message):
            Profile.model_validate(profile)


def test_the_api_takes_published_models_only_under_its_storage_prefixes(tmp_path: Path) -> None:
    settings = Settings(storage_url="s3://farm/renders")
    base = {"plans": ["s3://farm/plans/a.png"], "styles": ["modern"], "seeds": [1]}

    def spec(model: str) -> JobSpec:
        controls = [{"kind": "canny", "model": model}]
        return JobSpec.model_validate({**base, "profile": {"controls": controls}})

    check_remote(spec("s3://farm/models/canny"), settings)
    for model in ("s3://elsewhere/canny", f"file://{tmp_path}"):
        with pytest.raises(InvalidInput, match="profile.controls.0.model: .* the API takes s3:// URLs under"):
            check_remote(spec(model), settings)
