"""Hub models missing from the local cache while the hub cannot be reached: refused at once with one line that
says how to download them, at submit and in a worker's loader; a cached model never waits on a probe, and a
hub that answers keeps the notice that the model is downloaded on first use."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub.file_download import repo_folder_name
from typer.testing import CliRunner

from producer.cli import app
from producer.models import pin_models
from shared import hub
from shared.errors import InvalidInput, ModelError
from shared.registry import ALIASES
from shared.spec import Profile, load_profile
from workers.engine.models import ModelCache
from workers.engine.presets import resolve
from workers.preprocessors.depth import DepthEstimator

SD15 = ALIASES["sd15"]
TINY_UNIT = {"kind": "canny", "model": "tiny-canny"}


def refusal(repo_id: str, endpoint: str, cache: Path) -> str:
    return (
        f"{repo_id} is not in the local Hugging Face cache and the hub ({endpoint}) cannot be reached; "
        f"download it with `hf download {repo_id}` (or `huggingface-cli download {repo_id}`) into {cache}, "
        "the cache HF_HOME or HF_HUB_CACHE sets"
    )


def profile(base: str, *controls: dict[str, object]) -> Profile:
    return Profile.model_validate({"base": base, "width": 64, "height": 64, "steps": 2, "controls": list(controls)})


def store_in_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """`folder` as the hub library lays out a downloaded model: `refs/main` naming the snapshot of a commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty Hugging Face cache of the test's own, the hub allowed, and no probe answer remembered."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hub.reachable.cache_clear()
    yield home / "hub"
    hub.reachable.cache_clear()


def use_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)


@pytest.fixture
def hub_down(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The hub's endpoint is a local port nothing listens on: every connection is refused."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{unused.getsockname()[1]}"
    use_endpoint(monkeypatch, endpoint)
    return endpoint


class _Answers(http.server.BaseHTTPRequestHandler):
    probes = 0

    def do_HEAD(self) -> None:
        type(self).probes += 1
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test's output is not the place for an access log."""


@pytest.fixture
def hub_up(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[_Answers]]:
    """A local HTTP server as the hub's endpoint: it answers, so the hub counts as reachable."""
    handler = type("Answers", (_Answers,), {"probes": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    use_endpoint(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
    yield handler
    server.shutdown()
    server.server_close()


def test_render_refuses_a_model_it_cannot_download_in_one_line_and_stores_nothing(
    hub_down: str,
    hub_cache: Path,
    tmp_path: Path,
    models_dir: Path,
    example_plan: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("ARCHFARM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("ARCHFARM_MODELS_DIR", str(models_dir))
    args = ["render", str(example_plan), "--style", "modern", "--seeds", "1", "--profile", "sd15-archviz"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"archfarm: error: profile.base: {refusal(SD15, hub_down, hub_cache)}"
    ]
    assert not (tmp_path / "archfarm.db").exists() and not (tmp_path / "out").exists()


def test_a_worker_refuses_at_once_what_it_cannot_download(hub_down: str, hub_cache: Path, models_dir: Path) -> None:
    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    loads = {
        "sd15": lambda: cache.base("sd15"),
        "sd15-canny": lambda: cache.controlnet("sd15-canny"),
        "sdxl-vae-fp16": lambda: cache.vae("sdxl-vae-fp16"),
        "someone/base": lambda: cache.family("someone/base"),  # its config tells the family
    }
    for ref, load in loads.items():
        with pytest.raises(ModelError) as refused:
            load()
        repo_id = ALIASES.get(ref, ref)
        assert str(refused.value) == f"cannot load model {ref!r}: {refusal(repo_id, hub_down, hub_cache)}"
    with pytest.raises(ModelError, match=r"cannot load depth model 'Intel/dpt-large': Intel/dpt-large is not in"):
        DepthEstimator("Intel/dpt-large", torch.device("cpu"))
    assert not cache.loads
    assert hub.reachable.cache_info().misses == 1  # probed once for all of them


@pytest.mark.parametrize(
    ("unit", "field", "repo_id"),
    [
        ({"kind": "canny"}, "profile.controls.0.model (default)", ALIASES["sd15-canny"]),
        ({"kind": "depth", "model": "tiny-canny"}, "profile.controls.0.depth_model (default)", "Intel/dpt-large"),
    ],
)
def test_default_models_are_checked_too(
    hub_down: str, hub_cache: Path, models_dir: Path, unit: dict[str, object], field: str, repo_id: str
) -> None:
    store_in_cache(hub_cache, SD15, Path(resolve("tiny-sd15", models_dir)))
    with pytest.raises(InvalidInput) as refused:
        pin_models(profile("sd15", unit), here=True)
    assert str(refused.value) == f"{field}: {refusal(repo_id, hub_down, hub_cache)}"
    _, notices = pin_models(profile("sd15", unit), here=False)
    assert notices == []  # a farm's workers have caches of their own


def test_a_profile_with_only_its_base_downloaded_is_refused_at_submit(
    hub_down: str, hub_cache: Path, models_dir: Path
) -> None:
    store_in_cache(hub_cache, SD15, Path(resolve("tiny-sd15", models_dir)))
    with pytest.raises(InvalidInput) as refused:
        pin_models(load_profile("sd15-archviz"), here=True)
    canny = ALIASES["sd15-canny"]
    assert str(refused.value) == f"profile.controls.0.model (default): {refusal(canny, hub_down, hub_cache)}"


def test_a_cached_model_is_never_probed_for(hub_down: str, hub_cache: Path, models_dir: Path) -> None:
    store_in_cache(hub_cache, SD15, Path(resolve("tiny-sd15", models_dir)))
    pinned, notices = pin_models(profile("sd15", TINY_UNIT), here=True)
    assert pinned.base == "sd15" and notices == []
    assert hub.unloadable(SD15, "model_index.json") is None
    assert hub.reachable.cache_info().misses == 0


@pytest.mark.slow
def test_a_worker_loads_a_cached_model_without_a_probe(hub_down: str, hub_cache: Path, models_dir: Path) -> None:
    """In a process of its own, so every hub library module sees the closed endpoint from its import on."""
    store_in_cache(hub_cache, SD15, Path(resolve("tiny-sd15", models_dir)))
    script = (
        "import torch, pathlib, sys; from shared import hub; from workers.engine.models import ModelCache;"
        "cache = ModelCache(pathlib.Path(sys.argv[1]), torch.device('cpu'), torch.float32); cache.base('sd15');"
        "print(sum(cache.loads.values()), hub.reachable.cache_info().misses)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(models_dir)],
        env={**os.environ, "HF_ENDPOINT": hub_down, "HF_HOME": str(hub_cache.parent)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "0"]  # loaded from the cache; the hub was never probed


def test_a_hub_that_answers_keeps_the_notice_and_is_probed_once(hub_up: type[_Answers]) -> None:
    for _ in range(2):
        _, notices = pin_models(profile("someone/never-downloaded", TINY_UNIT), here=True)
        assert notices == [
            "profile.base: someone/never-downloaded is not in the local Hugging Face cache; it is downloaded on "
            "first use"
        ]
    assert hub.unloadable("someone/never-downloaded", "model_index.json") is None  # a worker downloads it
    assert hub_up.probes == 1
