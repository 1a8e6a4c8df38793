"""Built-in styles: names a job can use without writing prompts.

Prompts are tuned for SD 1.5/SDXL archviz renders of interiors seen from a floor plan; a job may also give
inline styles (`{name, prompt, negative_prompt}`), which take precedence over a built-in of the same name.
"""

from __future__ import annotations

_COMMON_NEGATIVE = "blurry, low quality, distorted geometry, warped walls, people, text, watermark"

CATALOG: dict[str, tuple[str, str]] = {
    "modern": (
        "modern interior design, clean lines, large windows, natural light, neutral palette, "
        "architectural photography, photorealistic",
        _COMMON_NEGATIVE + ", clutter, ornate",
    ),
    "industrial": (
        "industrial loft interior, exposed brick, concrete floor, black metal fixtures, steel beams, "
        "architectural photography, photorealistic",
        _COMMON_NEGATIVE + ", pastel colours",
    ),
    "scandinavian": (
        "scandinavian interior, white walls, light oak wooden floors, cosy textiles, soft daylight, "
        "architectural photography, photorealistic",
        _COMMON_NEGATIVE + ", dark, heavy furniture",
    ),
    "minimalist": (
        "minimalist interior, empty surfaces, white and grey, hidden storage, diffuse light, "
        "architectural photography, photorealistic",
        _COMMON_NEGATIVE + ", clutter, decoration",
    ),
    "japandi": (
        "japandi interior, natural wood, paper screens, low furniture, muted earth tones, calm, "
        "architectural photography, photorealistic",
        _COMMON_NEGATIVE + ", bright colours, plastic",
    ),
    "mediterranean": (
        "mediterranean interior, whitewashed plaster, terracotta tiles, arched doorways, warm sunlight, "
        "architectural photography, photorealistic",
        _COMMON_NEGATIVE + ", cold light",
    ),
    "brutalist": (
        "brutalist interior, raw board-formed concrete, monolithic volumes, dramatic shadows, "
        "architectural photography, photorealistic",
        _COMMON_NEGATIVE + ", ornament, wallpaper",
    ),
}
