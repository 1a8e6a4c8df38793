"""Built-in render profiles, selectable by name (`--profile tiny`, `profile: tiny`)."""

from __future__ import annotations

from typing import Any

BUILTIN: dict[str, dict[str, Any]] = {
    # Offline demo and tests: tiny models built locally, seconds per image on a CPU; `tiny-plan` is trained on
    # synthetic plans of many drawing styles (workers.training.demo), so renders follow the plan's footprint.
    # Plan depth, not edges: it marks inside and outside, which a toy net does not learn from edges in CPU-minutes.
    "tiny": {
        "base": "tiny-sd15",
        "controls": [{"kind": "plan-depth", "scale": 1.0, "model": "tiny-plan"}],
        "steps": 8,
        "guidance_scale": 7.5,
        "width": 128,
        "height": 128,
    },
    # The same archviz stack as sd15-archviz (edges + depth at [0.9, 0.6]) on tiny SD 1.5 and SDXL models.
    "tiny-archviz": {
        "base": "tiny-sd15",
        "controls": [
            {"kind": "canny", "scale": 0.9, "model": "tiny-plan"},
            {"kind": "plan-depth", "scale": 0.6, "model": "tiny-plan"},
        ],
        "steps": 8,
        "width": 128,
        "height": 128,
    },
    "tiny-sdxl": {
        "base": "tiny-sdxl",
        "controls": [{"kind": "canny", "scale": 0.5}],
        "steps": 8,
        "width": 128,
        "height": 128,
    },
    # One ControlNet-Union on tiny SDXL serving edges and depth in one pass.
    "tiny-sdxl-union": {
        "base": "tiny-sdxl",
        "union": "tiny-sdxl-union",
        "controls": [{"kind": "canny", "scale": 0.6}, {"kind": "plan-depth", "scale": 0.5}],
        "steps": 8,
        "width": 128,
        "height": 128,
    },
    # The transformer families at toy size: FLUX.1 with one FLUX ControlNet serving both units (as Union-Pro-2.0
    # does), FLUX.1 Control (the map as input channels of the base), SD 3 with its ControlNet.
    "tiny-flux": {
        "base": "tiny-flux",
        "controls": [{"kind": "canny", "scale": 0.7}, {"kind": "plan-depth", "scale": 0.5}],
        "steps": 8,
        "guidance_scale": 3.5,
        "width": 128,
        "height": 128,
    },
    "tiny-flux-control": {
        "base": "tiny-flux-control",
        "controls": [{"kind": "canny"}],
        "steps": 8,
        "guidance_scale": 3.5,
        "width": 128,
        "height": 128,
    },
    "tiny-sd3": {
        "base": "tiny-sd3",
        "controls": [{"kind": "canny", "scale": 0.7}, {"kind": "plan-depth", "scale": 0.5}],
        "steps": 8,
        "guidance_scale": 5.0,
        "width": 128,
        "height": 128,
    },
    # Edges and plan depth as two T2I-Adapters on tiny SD 1.5: run once per image, not at every step.
    "tiny-adapters": {
        "base": "tiny-sd15",
        "adapters": True,
        "controls": [{"kind": "canny", "scale": 0.9}, {"kind": "plan-depth", "scale": 0.6}],
        "steps": 8,
        "width": 128,
        "height": 128,
    },
    # The classic archviz stack on SD 1.5: edges + depth at [0.9, 0.6] (needs the real weights).
    # Depth comes from the plan's geometry: a monocular depth model sees a drawing, not a room.
    "sd15-archviz": {
        "base": "sd15",
        "controls": [{"kind": "canny", "scale": 0.9}, {"kind": "plan-depth", "scale": 0.6}],
        "steps": 30,
        "guidance_scale": 7.5,
        "width": 512,
        "height": 512,
        "scheduler": "unipc",
    },
    # SDXL with one Canny ControlNet at the lower scale SDXL ControlNets want (needs the real weights).
    "sdxl-archviz": {
        "base": "sdxl",
        "vae": "sdxl-vae-fp16",  # decodes in fp16; SDXL's own VAE is upcast to fp32
        "controls": [{"kind": "canny", "scale": 0.5}],
        "steps": 30,
        "guidance_scale": 7.0,
        "width": 1024,
        "height": 1024,
        "scheduler": "euler",
    },
    # SDXL with xinsir's ControlNet-Union (Apache-2.0): edges and plan depth as two modes of one network, one
    # pass per step instead of one per ControlNet (needs the real weights).
    "sdxl-union-archviz": {
        "base": "sdxl",
        "vae": "sdxl-vae-fp16",
        "union": "sdxl-union",
        "controls": [{"kind": "canny", "scale": 0.6}, {"kind": "plan-depth", "scale": 0.5}],
        "steps": 30,
        "guidance_scale": 7.0,
        "width": 1024,
        "height": 1024,
        "scheduler": "euler",
    },
    # SDXL with TencentARC's canny and depth T2I-Adapters (Apache-2.0): the cheapest SDXL control per step.
    "sdxl-adapter-archviz": {
        "base": "sdxl",
        "vae": "sdxl-vae-fp16",
        "adapters": True,
        "controls": [{"kind": "canny", "scale": 0.8}, {"kind": "plan-depth", "scale": 0.5}],
        "steps": 30,
        "guidance_scale": 7.0,
        "width": 1024,
        "height": 1024,
        "scheduler": "euler",
    },
    # FLUX.1 [dev] with Shakker's Union-Pro-2.0 serving edges and plan depth (non-commercial weights: a job needs
    # `use: non-commercial`); the ControlNet lets go for the last fifth of the steps, as its card advises.
    "flux-archviz": {
        "base": "flux-dev",
        "controls": [{"kind": "canny", "scale": 0.7, "end": 0.8}, {"kind": "plan-depth", "scale": 0.5, "end": 0.8}],
        "steps": 28,
        "guidance_scale": 3.5,
        "width": 1024,
        "height": 1024,
    },
    # FLUX.1 Canny [dev]: the edges as input channels of the base, no ControlNet pass (non-commercial weights).
    "flux-canny-archviz": {
        "base": "flux-canny",
        "controls": [{"kind": "canny"}],
        "steps": 28,
        "guidance_scale": 30.0,  # what the model is trained to follow
        "width": 1024,
        "height": 1024,
    },
    # SD 3.5 Large with Stability's Canny and Depth ControlNets (Community License: free below US$1M revenue).
    "sd35-archviz": {
        "base": "sd35",
        "controls": [{"kind": "canny", "scale": 0.8}, {"kind": "plan-depth", "scale": 0.6}],
        "steps": 40,
        "guidance_scale": 4.5,
        "width": 1024,
        "height": 1024,
    },
}


def builtin_profile(name: str) -> dict[str, Any]:
    """The settings of a built-in profile, to be validated as a `Profile`."""
    if name not in BUILTIN:
        raise ValueError(f"unknown profile {name!r} (built-in: {', '.join(sorted(BUILTIN))})")
    return BUILTIN[name]
