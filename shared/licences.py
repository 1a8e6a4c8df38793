"""What each known model's licence allows, as pure data: so a commercial studio never ships an image made with
weights whose licence forbids it by mistake.

A job is for `commercial` or `non-commercial` use (its `use:`, else the farm's `ARCHFARM_USE`, commercial by
default). At submit every model a job names or implies is looked up here: a licence that forbids commercial use
refuses a commercial job in one line naming the model and its licence; one that allows it only under
conditions (a revenue cap) and a hub model whose licence archfarm does not know are notices; a local folder or
a model published by URL is the studio's own, whose licence it knows. Licences as the model cards state them;
the card is the authority, and a model published again may change its terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.registry import ALIASES, PRESETS

Use = Literal["commercial", "non-commercial"]


@dataclass(frozen=True)
class Licence:
    name: str
    url: str
    commercial: Literal["yes", "no", "conditional"]
    conditions: str = ""


LICENCES: dict[str, Licence] = {
    "apache-2.0": Licence("Apache-2.0", "https://www.apache.org/licenses/LICENSE-2.0", "yes"),
    "mit": Licence("MIT", "https://opensource.org/license/mit", "yes"),
    "openrail": Licence("OpenRAIL", "https://huggingface.co/blog/open_rail", "yes"),
    "creativeml-openrail-m": Licence(
        "CreativeML OpenRAIL-M", "https://huggingface.co/spaces/CompVis/stable-diffusion-license", "yes"
    ),
    "openrail++": Licence(
        "CreativeML OpenRAIL++-M",
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md",
        "yes",
    ),
    "flux-1-dev-non-commercial-license": Licence(
        "FLUX.1 [dev] Non-Commercial License",
        "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
        "no",
    ),
    "stabilityai-ai-community": Licence(
        "Stability AI Community License",
        "https://stability.ai/community-license-agreement",
        "conditional",
        "free for commercial use only by organisations under US$1M annual revenue",
    ),
}

MODELS: dict[str, str] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
    "lllyasviel/sd-controlnet-canny": "openrail",
    "lllyasviel/sd-controlnet-depth": "openrail",
    "lllyasviel/control_v11f1e_sd15_tile": "openrail",
    "stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
    "diffusers/controlnet-canny-sdxl-1.0": "openrail++",
    "diffusers/controlnet-depth-sdxl-1.0": "openrail++",
    "madebyollin/sdxl-vae-fp16-fix": "mit",
    "xinsir/controlnet-tile-sdxl-1.0": "apache-2.0",
    "xinsir/controlnet-union-sdxl-1.0": "apache-2.0",
    "Intel/dpt-large": "apache-2.0",
    "h94/IP-Adapter": "apache-2.0",
    "TencentARC/t2iadapter_canny_sd15v2": "apache-2.0",
    "TencentARC/t2iadapter_depth_sd15v2": "apache-2.0",
    "TencentARC/t2i-adapter-canny-sdxl-1.0": "apache-2.0",
    "TencentARC/t2i-adapter-depth-midas-sdxl-1.0": "apache-2.0",
    "black-forest-labs/FLUX.1-dev": "flux-1-dev-non-commercial-license",
    "black-forest-labs/FLUX.1-Canny-dev": "flux-1-dev-non-commercial-license",
    "black-forest-labs/FLUX.1-Depth-dev": "flux-1-dev-non-commercial-license",
    "InstantX/FLUX.1-dev-Controlnet-Union": "flux-1-dev-non-commercial-license",
    "Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro-2.0": "flux-1-dev-non-commercial-license",
    "XLabs-AI/flux-controlnet-canny-diffusers": "flux-1-dev-non-commercial-license",
    "stabilityai/stable-diffusion-3.5-large": "stabilityai-ai-community",
    "stabilityai/stable-diffusion-3.5-medium": "stabilityai-ai-community",
    "stabilityai/stable-diffusion-3.5-large-controlnet-canny": "stabilityai-ai-community",
    "stabilityai/stable-diffusion-3.5-large-controlnet-depth": "stabilityai-ai-community",
    "stabilityai/stable-diffusion-3.5-large-controlnet-blur": "stabilityai-ai-community",
}
"""Hub ids by licence key, from their model cards. archfarm's tiny presets are its own (Apache-2.0)."""

PRESET_LICENCE = "apache-2.0"


def licence_of(ref: str) -> Licence | None:
    """The licence of a model reference (preset, alias or hub id); None when archfarm does not know it, as for
    local folders and models published by URL until they declare one (`declared`)."""
    key = licence_key(ref)
    return None if key is None else LICENCES[key]


def licence_key(ref: str) -> str | None:
    """The `LICENCES` key of a preset, alias or hub id archfarm knows; None otherwise."""
    return PRESET_LICENCE if ref in PRESETS else MODELS.get(ALIASES.get(ref, ref))


def declared(declaration: object, where: str) -> Licence | None:
    """The licence a model declares in its `archfarm-model.json` (`{"licence": KEY, ...}`, beside a published
    model's manifest fields, or alone in a local folder); None when it declares none. ValueError for a key
    archfarm does not know: a declaration that cannot be checked must not pass as none."""
    key = declaration.get("licence") if isinstance(declaration, dict) else None
    if key is None:
        return None
    if key not in LICENCES:
        raise ValueError(f"{where} declares licence {str(key)[:60]!r}; known: {', '.join(sorted(LICENCES))}")
    return LICENCES[key]


def check_use(field: str, model: str, licence: Licence | None, use: Use) -> str | None:
    """A notice about `model`'s licence for a job of this `use` (None: nothing to say). ValueError when the
    licence forbids it."""
    if use == "non-commercial":
        return None
    if licence is None:
        return f"{field}: the licence of {model} is not known to archfarm; check that it allows commercial use"
    if licence.commercial == "no":
        raise ValueError(
            f"{field}: {model} is under the {licence.name} ({licence.url}), which forbids commercial use; this job "
            "is for commercial use (set `use: non-commercial` for work that is not)"
        )
    if licence.commercial == "conditional":
        return f"{field}: {model} is under the {licence.name}: {licence.conditions}"
    return None
