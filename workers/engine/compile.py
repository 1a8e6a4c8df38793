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

from shared.errors import InvalidInput

RECOMPILE_LIMIT = 64
"""Dynamo's limit of compiled variants per code object (default 8). Every ControlNet of one architecture
shares `ControlNetModel.forward`'s entry, and each resolution, batch size and dtype adds a variant, so a worker
serving a few stacks at a few sizes passes 8 and would silently fall back to eager."""


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


def compile_module(module: nn.Module, options: CompileOptions, cache_dir: Path) -> nn.Module:
    """`module` wrapped by torch.compile (compiling itself happens on the first call, per input shape).

    inductor keeps what it generates under `cache_dir` unless TORCHINDUCTOR_CACHE_DIR says otherwise: a warm
    on-disk cache cut a first call from 163 s to 27 s (docs/performance.md).
    """
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    try:
        compiled: nn.Module = torch.compile(module, mode=options.mode, backend=options.backend, dynamic=options.dynamic)  # type: ignore[assignment]
        return compiled
    except RuntimeError as error:  # an unknown backend or mode
        raise InvalidInput(f"cannot compile with {options}: {str(error).splitlines()[0]}") from None
