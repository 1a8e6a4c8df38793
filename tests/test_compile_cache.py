"""Compiling once per fleet: `compile: auto`, the fleet's compile cache, and `archfarm warmup`.

Inductor on the tiny presets costs minutes on a CPU, so the cache's round trip through storage is proven on a
small module compiled with inductor in two fresh processes (the second must hit what the first stored); the
render path through `archfarm warmup` runs with `aot_eager`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from producer.cli import app
from shared.spec import Profile, load_profile
from shared.storage.local import LocalStorage
from workers.engine.compile import CompileOptions
from workers.engine.compile_cache import PREFIX, CompileKey, FleetCompileCache
from workers.renderer import compile_options

KEY = CompileKey(("tiny-sd15", "", "none", "tiny-canny"), 64, 64, 4, "torch.float32", CompileOptions())

FLEET_WORKER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch
    from torch._dynamo.utils import counters
    from shared.storage.local import LocalStorage
    from workers.engine.compile import CompileOptions, compile_module
    from workers.engine.compile_cache import CompileKey, FleetCompileCache

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3))
    options = CompileOptions(mode="default")
    compiled = compile_module(module, options)
    fleet = FleetCompileCache(LocalStorage(sys.argv[1]), torch.device("cpu"))
    for size in map(int, sys.argv[2].split(",")):
        key = CompileKey(("small",), size, size, 2, "torch.float32", options)
        with torch.inference_mode(), fleet.around(key) as warmth:
            compiled(torch.ones(2, 3, size, size))
    print(json.dumps({"state": warmth.state, **counters["inductor"]}))
    """
)


def fleet_worker(store: Path, inductor_cache: Path, sizes: str = "16") -> dict:
    """One fresh process with an empty inductor cache of its own, as on another machine; it compiles one key
    per size in `sizes` and reports how the last was served."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}
    done = subprocess.run(
        [sys.executable, "-c", FLEET_WORKER, str(store), sizes], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_worker_of_a_fleet_loads_what_the_first_compiled(tmp_path: Path) -> None:
    first = fleet_worker(tmp_path / "farm", tmp_path / "inductor-a")
    stored = list((tmp_path / "farm" / PREFIX).rglob("*.bin"))
    second = fleet_worker(tmp_path / "farm", tmp_path / "inductor-b")
    assert first["state"] == "cold" and first["fxgraph_cache_miss"] >= 1 and len(stored) == 1
    assert second["state"] == "warm" and second["fxgraph_cache_hit"] >= 1 and not second.get("fxgraph_cache_miss")


@pytest.mark.slow
def test_each_stored_bundle_holds_its_own_key_not_every_earlier_one(tmp_path: Path) -> None:
    """torch records every artefact since the process started; stored as they are, a worker's tenth key would
    carry the nine before it."""
    fleet_worker(tmp_path / "farm", tmp_path / "inductor", sizes="16,24,32")
    bundles = sorted((p.stat().st_mtime_ns, p.stat().st_size) for p in (tmp_path / "farm" / PREFIX).rglob("*.bin"))
    first, *later = [size for _, size in bundles]
    assert len(later) == 2 and all(size < 1.5 * first for size in later), (first, later)


def test_object_keys_part_by_what_compiled_code_depends_on() -> None:
    cpu = torch.device("cpu")
    name = KEY.object_key(cpu)
    assert name.startswith(f"{PREFIX}/torch-{torch.__version__}/cpu/") and name.endswith(".bin")
    others = [
        CompileKey(KEY.stack, 64, 128, 4, KEY.dtype, KEY.options),
        CompileKey(KEY.stack, 64, 64, 8, KEY.dtype, KEY.options),
        CompileKey(KEY.stack, 64, 64, 4, "torch.float16", KEY.options),
        CompileKey(("tiny-sd15", "", "int8", "tiny-canny"), 64, 64, 4, KEY.dtype, KEY.options),
        CompileKey(KEY.stack, 64, 64, 4, KEY.dtype, CompileOptions(mode="default")),
        CompileKey(KEY.stack, 64, 64, 4, KEY.dtype, KEY.options, sampler="euler"),
        CompileKey(KEY.stack, 64, 64, 4, KEY.dtype, KEY.options, guided=False),
        CompileKey(KEY.stack, 64, 64, 4, KEY.dtype, KEY.options, windows=((0.0, 0.5),)),
    ]
    assert len({name, *(other.object_key(cpu) for other in others)}) == 1 + len(others)
    assert KEY.object_key(cpu) == name  # stable across calls


class BrokenStorage(LocalStorage):
    def get(self, key: str) -> bytes:
        raise ConnectionError("storage is down")

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        raise ConnectionError("storage is down")


def test_a_storage_outage_costs_a_cold_compile_not_the_call(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fleet = FleetCompileCache(BrokenStorage(tmp_path), torch.device("cpu"))
    with fleet.around(KEY) as warmth:
        pass
    with fleet.around(KEY) as again:
        pass
    assert (warmth.state, again.state) == ("cold", "compiled")
    assert "storage is down" in caplog.text


def test_a_corrupt_bundle_is_ignored(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put(KEY.object_key(torch.device("cpu")), b"not a bundle")
    with FleetCompileCache(storage, torch.device("cpu")).around(KEY) as warmth:
        pass
    assert warmth.state == "cold"


def test_compile_auto_compiles_on_cuda_only() -> None:
    profile = load_profile("tiny")
    assert profile.compile == "auto"
    assert compile_options(profile, torch.device("cpu")) is None
    assert compile_options(profile, torch.device("cuda")) == CompileOptions(mode="reduce-overhead")
    forced = Profile.model_validate({**profile.model_dump(), "compile": True, "compile_backend": "aot_eager"})
    assert compile_options(forced, torch.device("cpu")) == CompileOptions(backend="aot_eager")
    off = Profile.model_validate({**profile.model_dump(), "compile": False})
    assert compile_options(off, torch.device("cuda")) is None


@pytest.fixture
def warmup_env(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in [k for k in os.environ if k.startswith("ARCHFARM_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("ARCHFARM_MODELS_DIR", str(models_dir))
    monkeypatch.setenv("ARCHFARM_STORAGE_URL", str(tmp_path / "farm"))
    monkeypatch.setenv("ARCHFARM_DEVICE", "cpu")
    return tmp_path


def test_warmup_on_a_cpu_has_nothing_to_compile_for_auto(warmup_env: Path) -> None:
    result = CliRunner().invoke(app, ["warmup", "tiny"])
    assert result.exit_code == 0, result.output
    assert "does not compile on cpu" in result.output and "nothing to do" in result.output


@pytest.mark.slow
def test_warmup_compiles_each_bucket_once(warmup_env: Path) -> None:
    profile = warmup_env / "profile.yaml"
    profile.write_text(
        "base: tiny-sd15\ncontrols: [{kind: canny}]\nsteps: 2\nwidth: 64\nheight: 64\n"
        "compile: true\ncompile_backend: aot_eager\n"
    )
    result = CliRunner().invoke(app, ["warmup", str(profile), "--batch", "3", "--batch", "4", "--batch", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()[-3:]
    assert lines[0].startswith("cpu batch 1: cold") and lines[1].startswith("cpu batch 4: cold")
    assert lines[2].startswith("cpu batch 4: compiled")


def test_unknown_profile_is_one_line(warmup_env: Path) -> None:
    result = CliRunner().invoke(app, ["warmup", "no-such-profile"])
    assert result.exit_code == 2 and "archfarm: error: --profile" in result.output
