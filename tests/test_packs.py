"""Style packs: a style's prompts and LoRA stored by name, pinned into every job that names it, the LoRA swapped
into a resident (and compiled) UNet in place between tasks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.config import Settings
from shared.errors import InvalidInput
from shared.packs import pack_names, store_pack
from shared.spec import JobSpec, Style
from shared.storage import Storages
from tests.models_fixture import PLAN_A
from workers.engine.loras import Lora
from workers.engine.models import ModelCache
from workers.engine.moodboards import Board, IPAdapter
from workers.engine.pipeline import Item, Request, Unit, render_batch
from workers.engine.presets import resolve
from workers.engine.tiny import IP_ADAPTER_WEIGHTS, style_lora


@pytest.fixture(scope="module")
def loras(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two LoRA files for the tiny SD 1.5 base, of different seeded weights."""
    base = Path(resolve("tiny-sd15", models_dir))
    return [style_lora(base, tmp_path_factory.mktemp(f"lora{seed}"), seed) for seed in (1, 2)]


def _board(*images: Image.Image, scale: float = 1.0, transfer: str = "all") -> Board:
    return Board(images, tuple(hashlib.sha256(image.tobytes()).hexdigest() for image in images), scale, transfer)


def _render(cache: ModelCache, lora: Lora | None, **changes: object) -> np.ndarray:
    request = Request(
        base="tiny-sd15",
        units=[Unit("tiny-canny", 1.0, 0.0, 1.0)],
        items=[Item("a bright living room", "blurry", 1, (PLAN_A,))],
        steps=4,
        guidance_scale=7.5,
        width=64,
        height=64,
        output_type="np",
        lora=lora,
        **changes,  # type: ignore[arg-type]
    )
    return render_batch(cache, request).images[0]  # type: ignore[return-value]


def test_a_lora_changes_the_render_and_weight_zero_or_none_is_bitwise_the_bare_style(
    models_dir: Path, loras: list[Path]
) -> None:
    """A pack's LoRA changes the image; at weight 0, and for a style without one after a LoRA style on the same
    UNet, the image is bit for bit the one of a worker that never held a LoRA."""
    bare = _render(ModelCache(models_dir, torch.device("cpu"), torch.float32), None)
    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    first, second = (_render(cache, Lora(str(path), 1.0, f"{i}" * 64)) for i, path in enumerate(loras))
    assert np.abs(first - bare).max() > 1 / 255 and np.abs(second - first).max() > 1 / 255
    assert np.array_equal(_render(cache, None), bare)
    assert np.array_equal(_render(cache, Lora(str(loras[0]), 0.0, "0" * 64)), bare)
    assert np.array_equal(_render(cache, Lora(str(loras[0]), 1.0, "0" * 64)), first)  # swapped back exactly
    assert cache.loras.swaps == 4


def test_a_mood_board_changes_the_render_and_at_scale_zero_or_without_one_adds_nothing(
    models_dir: Path, model_cache: ModelCache
) -> None:
    """Through the tiny IP-Adapter: a board changes the image, another board changes it differently, and its
    style-only transfer differs from transferring everywhere; at scale 0, and for a style without a board on
    a UNet holding the adapter, the image is bit for bit the bare style's."""
    adapter = IPAdapter("tiny-ip-adapter", resolve("tiny-ip-adapter", models_dir), IP_ADAPTER_WEIGHTS, "image_encoder")
    bare = _render(ModelCache(models_dir, torch.device("cpu"), torch.float32), None)
    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    warm, cold = Image.new("RGB", (64, 64), (200, 140, 90)), Image.new("RGB", (64, 64), (60, 90, 200))
    on_warm = _render(cache, None, board=_board(warm), ip_adapter=adapter)
    on_cold = _render(cache, None, board=_board(cold), ip_adapter=adapter)
    style_only = _render(cache, None, board=_board(warm, transfer="style"), ip_adapter=adapter)
    assert (
        min(np.abs(on_warm - bare).max(), np.abs(on_cold - on_warm).max(), np.abs(style_only - on_warm).max()) > 1 / 255
    )
    assert np.array_equal(_render(cache, None, board=_board(warm, scale=0.0), ip_adapter=adapter), bare)
    assert np.array_equal(_render(cache, None), bare)
    assert cache.boards.encodes == 2  # each board image encoded once


@pytest.mark.slow
def test_style_changes_on_a_compiled_worker_compile_nothing_new(models_dir: Path, loras: list[Path]) -> None:
    """Compiled (aot_eager): after the first LoRA style, switching to another LoRA, to none and back adds no
    graph, and each image is within 1/255 of its eager render."""
    from torch._dynamo.utils import counters

    from workers.engine.compile import CompileOptions

    options = CompileOptions(mode="default", backend="aot_eager")
    eager = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    compiled = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    styles = [Lora(str(loras[0]), 1.0, "a" * 64), Lora(str(loras[1]), 0.8, "b" * 64), None]
    _render(compiled, styles[0], compile=options)
    graphs = counters["stats"]["unique_graphs"]
    for lora in [*styles[1:], styles[0]]:
        image = _render(compiled, lora, compile=options)
        assert np.abs(image - _render(eager, lora)).max() <= 1 / 255
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_pack_is_stored_named_by_jobs_pinned_and_checked(
    tmp_path: Path, loras: list[Path], example_plan: Path
) -> None:
    """`styles add` checks the LoRA and pins it by content hash; a job naming the pack carries it inline with
    its hash (a style without a LoRA keeps its old digest); a text-encoder LoRA or a file that is no LoRA is
    refused; an unknown name says where packs come from."""
    from safetensors.torch import save_file

    from producer.client import Farm

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'state.db'}", storage_url=str(tmp_path / "farm"))
    storages = Storages(settings)
    with Farm(settings) as farm:
        stored = store_pack(storages, Style(name="villa", prompt="warm oak villa", loras=[{"file": str(loras[0])}]))
        assert pack_names(storages.open()) == ["villa"] and stored.loras[0].file_sha256 is not None
        assert stored.loras[0].file.startswith((tmp_path / "farm" / "inputs").as_uri())
        spec = JobSpec.from_document(
            {"plans": [str(example_plan)], "styles": ["villa", "modern"], "seeds": [1], "profile": "tiny"},
            packs=farm.pack,
        )
        modern = spec.resolved_styles[1]
        fields = {"name": modern.name, "prompt": modern.prompt, "negative_prompt": modern.negative_prompt}
        before_packs = hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        assert spec.resolved_styles[0] == stored and modern.digest() == before_packs
        bad = tmp_path / "text.safetensors"
        save_file({"text_encoder.layer.lora_A.weight": torch.zeros(2, 2)}, str(bad))
        with pytest.raises(InvalidInput, match="holds text-encoder LoRA weights"):
            store_pack(storages, Style(name="bad", prompt="x", loras=[{"file": str(bad)}]))
        with pytest.raises(InvalidInput, match="not a .safetensors file"):
            store_pack(storages, Style(name="bad", prompt="x", loras=[{"file": str(example_plan)}]))
        with pytest.raises(InvalidInput, match="is a built-in style"):
            store_pack(storages, Style(name="modern", prompt="x"))
    with pytest.raises(InvalidInput, match="unknown style 'nope': no stored pack of that name"):
        JobSpec.from_document({"plans": ["p.png"], "styles": ["nope"], "seeds": [1], "profile": "tiny"})


@pytest.mark.slow
def test_a_job_naming_a_pack_renders_with_its_lora_records_its_hash_and_rerenders_bitwise(
    tmp_path: Path, models_dir: Path, loras: list[Path], example_plan: Path
) -> None:
    from typer.testing import CliRunner

    from producer.cli import app
    from producer.client import Farm
    from producer.rerender import rerender

    env = {
        "ARCHFARM_DATABASE_URL": f"sqlite:///{tmp_path / 'state.db'}",
        "ARCHFARM_STORAGE_URL": str(tmp_path / "farm"),
        "ARCHFARM_MODELS_DIR": str(models_dir),
    }
    board = tmp_path / "board.png"
    Image.new("RGB", (64, 64), (200, 140, 90)).save(board)
    pack = [
        "villa",
        "--prompt",
        "warm oak villa",
        "--lora",
        str(loras[0]),
        "--reference",
        str(board),
        "--seeds",
        "901,77",
        "--palette",
        "#c8b496,#8c6e50",
    ]
    added = CliRunner().invoke(app, ["styles", "add", *pack], env=env)
    assert added.exit_code == 0, added.output
    shown = CliRunner().invoke(app, ["styles", "show", "villa"], env=env).output
    assert "lora: " in shown and "weight 1" in shown and "mood board (style, scale 0.8):" in shown
    assert "seed family: 901, 77" in shown and "palette: #c8b496, #8c6e50" in shown
    refused = CliRunner().invoke(app, ["styles", "add", "odd", "--prompt", "x", "--seeds", "1,one"], env=env)
    assert refused.exit_code != 0 and "seeds.1" in refused.output
    settings = Settings(**{k.removeprefix("ARCHFARM_").lower(): v for k, v in env.items()}, broker_url=None)
    job = {"plans": [str(example_plan)], "styles": ["villa", "modern"], "seeds": [1, 2], "profile": "tiny"}
    with Farm(settings) as farm:
        images = farm.results(farm.submit(job))
    by_style = {(i.style, i.seed): Path(i.url.removeprefix("file://")) for i in images}
    assert set(by_style) == {("villa", 901), ("villa", 77), ("modern", 1), ("modern", 2)}  # the pack's seeds
    sidecar = json.loads(by_style["villa", 901].with_suffix(".json").read_text())
    pack = farm.pack("villa")
    assert pack is not None and pack.reference is not None
    assert sidecar["style"]["loras"][0]["file_sha256"] == pack.loras[0].file_sha256
    assert sidecar["style"]["reference"]["images_sha256"] == pack.reference.images_sha256
    assert sidecar["models"]["ip_adapter"]["name"] == "tiny-ip-adapter"
    again = rerender(by_style["villa", 901].with_suffix(".json"), tmp_path / "again", settings)
    assert again.comparison.identical, again.verdict
