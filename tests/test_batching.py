"""Images of different tasks in one pipeline call: different plans (control maps), styles (prompts) and seeds.

Each image keeps its own noise and prompt, so it matches its render alone within 1/255 (kernels batch their
arithmetic); a call of one task is bitwise what diffusers' own pipeline makes from the prompt text; prompts
are encoded once per process.
"""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import StableDiffusionControlNetPipeline

from tests.models_fixture import PLAN_A, PLAN_B, SIZE, STEPS, tiny_render
from workers.engine.models import ModelCache
from workers.engine.pipeline import ControlInput, Item, Request, Unit, render_batch

MODERN = ("a bright modern living room, oak floor", "blurry")
LOFT = ("an industrial loft, exposed brick", "people, text")


def alone(cache: ModelCache, base: str, net: str, plan, prompts: tuple[str, str], seed: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    result = tiny_render(
        cache,
        base=base,
        net=net,
        seeds=[seed],
        controls=[ControlInput(net, plan, 1.0, 0.0, 1.0)],
        prompt=prompts[0],
        negative_prompt=prompts[1],
        output_type="np",
    )
    return np.asarray(result.images[0])


@pytest.mark.parametrize(("base", "net"), [("tiny-sd15", "tiny-canny"), ("tiny-sdxl", "tiny-sdxl-controlnet")])
@pytest.mark.slow
def test_a_batch_of_tasks_matches_each_task_alone(model_cache: ModelCache, base: str, net: str) -> None:
    items = [
        Item(*MODERN, 3, (PLAN_A,)),
        Item(*LOFT, 3, (PLAN_B,)),
        Item(*MODERN, 8, (PLAN_B,)),
        Item(*LOFT, 11, (PLAN_A,)),
    ]
    batch = render_batch(
        model_cache,
        Request(
            base=base,
            units=[Unit(net, 1.0, 0.0, 1.0)],
            items=items,
            steps=STEPS,
            guidance_scale=7.5,
            width=SIZE,
            height=SIZE,
            output_type="np",
        ),
    )
    for item, image in zip(items, batch.images, strict=True):
        single = alone(model_cache, base, net, item.maps[0], (item.prompt, item.negative_prompt), item.seed)
        assert np.abs(np.asarray(image) - single).max() <= 1 / 255
    # Different inputs do make different images: the batch did not collapse them into one.
    assert np.abs(np.asarray(batch.images[0]) - np.asarray(batch.images[2])).max() > 1 / 255


@pytest.mark.slow
def test_one_task_is_bitwise_what_the_pipeline_makes_from_its_prompt(model_cache: ModelCache) -> None:
    """Prompt embeddings encoded once and reused are the very tensors diffusers would have encoded itself."""
    ours = tiny_render(model_cache, base="tiny-sd15", net="tiny-canny", seeds=[5, 6], output_type="np")
    components = model_cache.base("tiny-sd15")
    pipe = StableDiffusionControlNetPipeline(
        **components,
        controlnet=model_cache.controlnet("tiny-canny"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    import torch

    theirs = pipe(
        prompt="a bright living room, oak floor",
        negative_prompt="blurry",
        image=PLAN_A,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        width=SIZE,
        height=SIZE,
        num_images_per_prompt=2,
        generator=[torch.Generator("cpu").manual_seed(s) for s in (5, 6)],
        output_type="np",
    ).images
    assert np.array_equal(np.stack(ours.images), theirs)


@pytest.mark.slow
def test_prompts_are_encoded_once_per_pair(models_dir) -> None:  # type: ignore[no-untyped-def]
    import torch

    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    for seed in (1, 2, 3):
        tiny_render(cache, base="tiny-sd15", net="tiny-canny", seeds=[seed])
    assert cache.prompt_encodes == 1
    tiny_render(cache, base="tiny-sd15", net="tiny-canny", seeds=[1], prompt="another room")
    assert cache.prompt_encodes == 2


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True])
def test_each_hint_encoder_runs_once_per_call(models_dir, compiled: bool) -> None:  # type: ignore[no-untyped-def]
    """The control image is encoded once per call, not at every step, also by a compiled net (whose graph would
    otherwise hold the encoder); the images are unchanged (the comparison with diffusers' own pipeline above
    runs with the encoder cached), and a second call compiles nothing new."""
    import torch
    from torch._dynamo.utils import counters

    from workers.engine.compile import CompileOptions

    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    options = CompileOptions(mode="default", backend="aot_eager") if compiled else None
    encoder = cache.controlnet("tiny-canny").controlnet_cond_embedding.encoder
    calls: list[int] = []
    handle = encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        plain = tiny_render(cache, base="tiny-sd15", net="tiny-canny", seeds=[1, 2], output_type="np", compile=options)
        first, graphs = len(calls), counters["stats"]["unique_graphs"]
        again = tiny_render(cache, base="tiny-sd15", net="tiny-canny", seeds=[1, 2], output_type="np", compile=options)
        assert (len(calls) - first, counters["stats"]["unique_graphs"]) == (1, graphs)
        # Two units on the same net, with two maps: each encoded once.
        two = [ControlInput("tiny-canny", PLAN_A, 0.5, 0.0, 1.0), ControlInput("tiny-canny", PLAN_B, 0.5, 0.0, 1.0)]
        before = len(calls)
        tiny_render(cache, base="tiny-sd15", net="tiny-canny", seeds=[1], controls=two, compile=options)
    finally:
        handle.remove()
    assert (first, len(calls) - before) == (1, 2)
    assert np.array_equal(np.stack(plain.images), np.stack(again.images))
    eager = tiny_render(
        ModelCache(models_dir, torch.device("cpu"), torch.float32),
        base="tiny-sd15",
        net="tiny-canny",
        seeds=[1, 2],
        output_type="np",
    )
    assert np.allclose(np.stack(plain.images), np.stack(eager.images), atol=1e-4)
