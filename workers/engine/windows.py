"""ControlNet stacks that run only the nets whose guidance window covers the current step (SD 1.5 and SDXL, FLUX.1,
SD 3).

diffusers runs every ControlNet at every step and multiplies its residuals by 0 outside its
`control_guidance_start/end` window (it passes the product scale × in-window as `conditioning_scale`). A net
whose scale is 0 at a step contributes exactly zero, so skipping it changes nothing but the time: summing
fewer residuals drops only `+ 0` terms, and when every net is skipped the UNet gets no residuals at all, which
it treats as "no ControlNet" (adding zeros is the identity). Outputs stay bitwise identical.

Both `StableDiffusionControlNetPipeline` and `StableDiffusionXLControlNetPipeline` accept this: they take any
`MultiControlNetModel` (lists per unit, also for one net), call it once per step with the per-unit scales,
and pass its two results straight to the UNet, whose `None` default means no residuals.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxMultiControlNetModel, MultiControlNetModel, SD3MultiControlNetModel


class WindowedControlNets(MultiControlNetModel):
    """`MultiControlNetModel` that skips every net whose conditioning scale is 0 at this step."""

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: list[torch.Tensor],
        conditioning_scale: list[float],
        guess_mode: bool = False,
        return_dict: bool = False,  # accepted for the pipeline's sake; a tuple either way, as the base class does
        **kwargs: Any,
    ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        units = [unit for unit in zip(controlnet_cond, conditioning_scale, self.nets, strict=True) if unit[1] != 0]
        if not units:
            if not guess_mode:
                return None, None
            # In guess mode the pipeline pads the residuals with zeros for the unconditional half, so it needs
            # tensors: run one net at scale 0, as diffusers would have.
            units = [(controlnet_cond[0], 0.0, self.nets[0])]
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for image, scale, net in units:
            # Outside guess mode the net only multiplies its residuals by the scale at its end. Doing that here,
            # on the net's scale-1 output, gives the same floats (x * 1.0 == x) while a compiled net sees one
            # constant instead of one value per unit and step, each of which would be a recompile.
            outside = not guess_mode
            net_down, net_mid = net(
                sample=sample,
                timestep=timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=image,
                conditioning_scale=1.0 if outside else scale,
                guess_mode=guess_mode,
                return_dict=False,
                **kwargs,
            )
            if outside:
                net_down, net_mid = [d * scale for d in net_down], net_mid * scale
            # Summed in unit order, as the base class does, so the floating-point result is the same.
            down = net_down if down is None else [a + b for a, b in zip(down, net_down, strict=True)]
            mid = net_mid if mid is None else mid + net_mid
        return down, mid


class WindowedFluxControlNets(FluxMultiControlNetModel):
    """`FluxMultiControlNetModel` that skips every net whose conditioning scale is 0 at this step, as
    `WindowedControlNets` does for SD: FLUX's pipeline passes a `None` result to its transformer as "no
    ControlNet". One net serving several units (diffusers' single-net case) runs once per unit in window."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        controlnet_cond: list[torch.Tensor],
        controlnet_mode: list[torch.Tensor],
        conditioning_scale: list[float],
        return_dict: bool = False,  # a tuple either way, as the pipeline unpacks it
        **kwargs: Any,
    ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        nets = list(self.nets) if len(self.nets) > 1 else [self.nets[0]] * len(controlnet_cond)
        merged: tuple[list[torch.Tensor] | None, ...] | None = None
        for image, mode, scale, net in zip(controlnet_cond, controlnet_mode, conditioning_scale, nets, strict=True):
            if scale == 0:
                continue
            samples = net(
                hidden_states=hidden_states,
                controlnet_cond=image,
                controlnet_mode=mode[:, None],
                conditioning_scale=1.0,  # scaled below, as `WindowedControlNets` does: one constant to compile
                return_dict=False,
                **kwargs,
            )
            merged = _merged(merged, tuple(_scaled(part, scale) for part in samples))
        return (None, None) if merged is None else (merged[0], merged[1])


class WindowedSD3ControlNets(SD3MultiControlNetModel):
    """`SD3MultiControlNetModel` that skips every net whose conditioning scale is 0 at this step; SD 3's
    transformer takes a `None` result as "no ControlNet"."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        controlnet_cond: list[torch.Tensor],
        conditioning_scale: list[float],
        return_dict: bool = False,
        **kwargs: Any,
    ) -> tuple[list[torch.Tensor] | None]:
        merged: tuple[list[torch.Tensor] | None, ...] | None = None
        for image, scale, net in zip(controlnet_cond, conditioning_scale, self.nets, strict=True):
            if scale == 0:
                continue
            samples = net(
                hidden_states=hidden_states, controlnet_cond=image, conditioning_scale=1.0, return_dict=False, **kwargs
            )
            merged = _merged(merged, tuple(_scaled(part, scale) for part in samples))
        return (None,) if merged is None else (merged[0],)


def _scaled(samples: list[torch.Tensor] | None, scale: float) -> list[torch.Tensor] | None:
    return None if samples is None else [sample * scale for sample in samples]


def _merged(
    total: tuple[list[torch.Tensor] | None, ...] | None, samples: tuple[list[torch.Tensor] | None, ...]
) -> tuple[list[torch.Tensor] | None, ...]:
    """The residuals summed in unit order, as diffusers' multi-net wrappers sum them (a part one net lacks
    keeps the earlier total), so the floats are theirs."""
    if total is None:
        return samples
    return tuple(
        a if a is None or b is None else [x + y for x, y in zip(a, b, strict=True)]
        for a, b in zip(total, samples, strict=True)
    )
