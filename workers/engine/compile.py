"""torch.compile for the UNet and ControlNets: settings, and the process-wide knobs compiling needs.

A compile costs minutes (docs/performance.md: 163–231 s on CPU with inductor) against well under a second per image, so
each module is compiled once per worker process and kept by the `ModelCache`; the same shapes then reuse it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from shared.errors import InvalidInput

RECOMPILE_LIMIT = 64
"""Compiled variants allowed per compiled module (dynamo's default: 8 per code object). Each resolution, batch
bucket, dtype and sampler adds a variant."""
_compiled_modules = 0


@dataclass(frozen=True)
class CompileOptions:
    """How to compile, as `torch.compile` takes it. inductor with CUDA graphs ("reduce-overhead") for GPUs, where
    replaying a captured step frees the pace from the host issuing kernels; "aot_eager" traces without
    generating code (seconds, not minutes), which is what most tests on CPU use."""

    mode: str = "reduce-overhead"
    backend: str = "inductor"
    dynamic: bool | None = False
    """Static shapes: calls are padded to a few batch buckets (`workers.engine.batching`), each compiled (and,
    with CUDA graphs, captured) once, rather than one dynamic graph that CUDA graphs re-record per size anyway."""

    @property
    def replays_graphs(self) -> bool:
        """Whether compiled calls replay CUDA graphs, whose outputs live in memory the next replay overwrites."""
        return self.mode in ("reduce-overhead", "max-autotune")


def use_inductor_cache(folder: Path) -> None:
    """Keep what inductor generates under `folder` unless TORCHINDUCTOR_CACHE_DIR says otherwise: a warm on-disk
    cache cut a first call from 163 s to 27 s (docs/performance.md). Set when a worker's model cache is made,
    before anything compiles or loads the fleet's artefacts, which land in whatever folder is set then."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))


def compile_module(module: nn.Module, options: CompileOptions) -> nn.Module:
    """`module` wrapped by torch.compile (compiling itself happens on the first call, per input shape)."""
    _raise_recompile_limits()
    try:
        compiled: nn.Module = torch.compile(module, mode=options.mode, backend=options.backend, dynamic=options.dynamic)  # type: ignore[assignment]
    except RuntimeError as error:  # an unknown backend or mode
        raise InvalidInput(f"cannot compile with {options}: {str(error).splitlines()[0]}") from None
    if options.replays_graphs:
        compiled.register_forward_hook(_owned_outputs)
    return compiled


def _raise_recompile_limits() -> None:
    """`RECOMPILE_LIMIT` for each module compiled in this process. Dynamo counts variants per code object, and
    diffusers wraps the UNet's and every ControlNet's `forward` in one decorator whose code object they all
    share, so a single limit would be spent by all nets × buckets × sizes together; past it dynamo runs new
    variants eagerly."""
    global _compiled_modules
    _compiled_modules += 1
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT * _compiled_modules)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * config.recompile_limit)


def _owned_outputs(_module: nn.Module, _args: tuple[object, ...], output: object) -> object:
    """Copies of a graph replay's outputs, which the next replay overwrites: the schedulers keep outputs across
    steps (PNDM's history, without classifier-free guidance nothing else copies the UNet's output), and a stack
    of ControlNets keeps one net's residuals while the next net replays. A hook on the compiled wrapper runs
    outside the graph; the copies cost a memcpy of the latents and residuals per call."""
    return tree_map_only(torch.Tensor, torch.clone, output)
