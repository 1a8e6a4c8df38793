"""Ahead-of-time compilation (AOTInductor) against the fleet's compile cache: what a worker waits for before it
serves a batch bucket, and whether one package serves every ControlNet of an architecture.

    python bench/aot.py [--quick] [--json]                    # on a CUDA machine: full-size SD 1.5, fp16
    python bench/aot.py --device cpu --tiny [--quick] [--json]  # the same on a CPU, tiny SD 1.5
    python bench/aot.py ... --only aoti                         # one way (aoti or fleet-cache), not both

Per module (the ControlNet, then the UNet taking two ControlNets' residuals; `--quick`: the ControlNet only),
at one batch bucket, each step in a fresh process with an inductor cache of its own, as on another machine:

- **fleet compile cache** (what workers use today, through the engine's own `compile_module` and
  `FleetCompileCache`): `torch.compile` (inductor; CUDA graphs on a GPU) compiles cold and stores its artefacts;
  a second process loads them and makes its first call, which still traces the model with dynamo and loads
  every graph;
- **AOTInductor**: `torch.export` and `aoti_compile_and_package` with the weights kept out of the package,
  cold; a second process loads the package (`aoti_load_package`), hands it a ControlNet's own weights
  (`load_constants`, sharing the module's memory) and calls it. The same package is loaded again with another
  ControlNet's weights: one package per architecture and bucket serves every net of it. Both are checked
  against eager, and against each other (a package that ignored the weights it was given would agree with
  one net only). On a GPU the loaded package is also captured in a `torch.cuda.CUDAGraph` and replayed.

Printed per module: seconds to first call (cold and warm, each way), milliseconds per call in the steady state
(eager, torch.compile, AOTInductor, AOTInductor in a CUDA graph), the package's size and the largest
difference from eager. On a CPU, a fresh inductor cache first probes the CPU's vector instructions by building
small programs (~9 s, once per machine: the result is cached): it is printed apart ("machine probe s"), not
counted in either way's first call.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._inductor.cpu_vec_isa import pick_vec_isa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import gpu
from shared.storage.local import LocalStorage
from workers.engine.compile import CompileOptions, compile_module
from workers.engine.compile_cache import CompileKey, FleetCompileCache

MODULES = ("controlnet", "unet")
WAYS = {"fleet-cache": ("compile-cold", "compile-warm"), "aoti": ("aoti-cold", "aoti-warm")}


class ControlNetCall(nn.Module):
    """A ControlNet as the engine calls it, with its conditioning scale an input rather than a constant, so one
    compiled graph serves every scale (a float argument would be baked into the graph)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, hint: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        down, mid = self.net(sample, timestep, encoder_hidden_states=text, controlnet_cond=hint, return_dict=False)
        return (*(residual * scale for residual in down), mid * scale)


class UNetCall(nn.Module):
    """The UNet as a step with ControlNets calls it: the summed residuals as inputs."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, *residuals: torch.Tensor
    ) -> torch.Tensor:
        return self.net(
            sample,
            timestep,
            encoder_hidden_states=text,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


def load(work: Path, module: str, index: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """ControlNet `index`, or the UNet, from the saved models, wrapped as the engine calls it."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    if module == "controlnet":
        net = ControlNetModel.from_pretrained(work / f"sd15-controlnet-{index}", torch_dtype=dtype)
        return ControlNetCall(net).to(device).eval()
    unet = UNet2DConditionModel.from_pretrained(work / "sd15-base" / "unet", torch_dtype=dtype)
    return UNetCall(unet).to(device).eval()


def image_size(args: argparse.Namespace) -> int:
    return 64 if args.tiny else 512


def inputs(work: Path, module: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple:
    """Seeded inputs at the bucket: a UNet's residuals are ControlNet 0's own outputs (eager)."""
    generator = torch.Generator().manual_seed(0)
    size = image_size(args)
    latent = size // 8
    width = 32 if args.tiny else 768

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    sample, text = randn(args.batch, 4, latent, latent), randn(args.batch, 77, width)
    timestep = torch.tensor(500, device=device)
    hint = torch.rand(args.batch, 3, size, size, generator=generator).to(device, dtype)
    scale = torch.tensor(0.9, device=device, dtype=dtype)
    if module == "controlnet":
        return sample, timestep, text, hint, scale
    with torch.inference_mode():
        residuals = load(work, "controlnet", 0, device, dtype)(sample, timestep, text, hint, scale)
    return (sample, timestep, text, *residuals)


def per_call_ms(fn: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    for _ in range(2):
        fn()
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - started) / repeats * 1e3


def largest_difference(a: object, b: object) -> float:
    flat_a = a if isinstance(a, tuple | list) else (a,)
    flat_b = b if isinstance(b, tuple | list) else (b,)
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(flat_a, flat_b, strict=True))


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One step of the evaluation in this (fresh) process; returns its measurements."""
    device, dtype = gpu.bench_device(args.device)
    sync = gpu.synchronizer(device)
    work, module, repeats = Path(args.work), args.module, args.repeats
    model = load(work, module, 0, device, dtype)
    given = inputs(work, module, args, device, dtype)
    package = work / f"{module}.pt2"
    out: dict[str, Any] = {}
    if device.type == "cpu" and args.role.endswith("warm"):
        started = time.perf_counter()
        pick_vec_isa()
        out["machine probe s"] = time.perf_counter() - started
    with torch.inference_mode():
        if args.role.startswith("compile"):
            # Today's way exactly as a worker runs it: the engine's compile settings and the fleet's compile cache.
            options = CompileOptions(mode="reduce-overhead" if device.type == "cuda" else "default")
            key = CompileKey((module,), image_size(args), image_size(args), args.batch, str(dtype), options)
            storage = LocalStorage(work / "fleet")
            fleet = FleetCompileCache(storage, device)
            if args.role == "compile-cold":
                out["eager ms"] = per_call_ms(lambda: model(*given), sync, repeats)
            compiled = compile_module(model, options)
            started = time.perf_counter()
            with fleet.around(key) as warmth:  # loads the artefacts first when warm, stores them after when cold
                compiled(*given)
                sync()
                out["first call s"] = time.perf_counter() - started
            assert warmth.state == args.role.removeprefix("compile-"), warmth
            if args.role == "compile-cold":
                out["steady ms"] = per_call_ms(lambda: compiled(*given), sync, repeats)
                out["artefacts MB"] = len(storage.get(key.object_key(device))) / 1e6
        elif args.role == "aoti-cold":
            started = time.perf_counter()
            exported = torch.export.export(model, given, strict=False)
            out["export s"] = time.perf_counter() - started
            torch._inductor.aoti_compile_and_package(
                exported,
                package_path=str(package),
                inductor_configs={"aot_inductor.package_constants_in_so": False},
            )
            out["first call s"] = time.perf_counter() - started  # export + compile; loading is the warm step's
            out["package MB"] = package.stat().st_size / 1e6
        else:  # aoti-warm
            out.update(aoti_warm(work, module, model, given, package, device, dtype, sync, repeats))
    return out


def loaded(package: Path, model: nn.Module, single_threaded: bool = False) -> Any:
    """The package loaded with `model`'s own weights: the loader keeps pointers to the module's tensors
    (`user_managed`), so a worker holds each net's weights once, however many buckets it has loaded.
    `single_threaded` runs it without the loader's thread pool, which a CUDA graph capture needs
    (pytorch/pytorch#148601: "operation not permitted when stream is capturing" otherwise)."""
    runner = torch._inductor.aoti_load_package(str(package), run_single_threaded=single_threaded)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}  # buffers: persistent or not
    weights = {name: tensors[name] for name in runner.get_constant_fqns()}
    runner.load_constants(weights, check_full_update=True, user_managed=True)
    return runner


def aoti_warm(  # the measurement's whole setting
    work: Path,
    module: str,
    model: nn.Module,
    given: tuple,
    package: Path,
    device: torch.device,
    dtype: torch.dtype,
    sync: Callable[[], None],
    repeats: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    started = time.perf_counter()
    runner = loaded(package, model)
    result = runner(*given)
    sync()
    out["first call s"] = time.perf_counter() - started
    out["steady ms"] = per_call_ms(lambda: runner(*given), sync, repeats)
    out["eager ms"] = per_call_ms(lambda: model(*given), sync, repeats)
    expected = model(*given)
    out["difference from eager"] = largest_difference(result, expected)
    if module == "controlnet":  # the same package with the second ControlNet's weights
        other = load(work, module, 1, device, dtype)
        own = other(*given)
        out["second net: difference from its eager"] = largest_difference(loaded(package, other)(*given), own)
        out["second net: difference from the first"] = largest_difference(own, expected)
    if device.type == "cuda":
        out.update(in_a_cuda_graph(loaded(package, model, single_threaded=True), given, expected, repeats))
    return out


def in_a_cuda_graph(runner: Any, given: tuple, expected: object, repeats: int) -> dict[str, Any]:
    """The loaded package captured once in a CUDA graph on static inputs, then replayed: what a worker would
    do per bucket, with window skipping staying Python between per-net graphs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            runner(*given)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = runner(*given)
    graph.replay()
    torch.cuda.synchronize()
    return {
        "in a CUDA graph: steady ms": per_call_ms(graph.replay, torch.cuda.synchronize, repeats),
        "in a CUDA graph: difference from eager": largest_difference(captured, expected),
    }


def distinct_controlnets(folders: list[Path]) -> None:
    """Seeded, different weights in each ControlNet's zero convolutions, scaled to keep residuals near unit size
    (fp16 must not overflow): built from the UNet, every net starts as the same one, whose residuals are all
    zero, and a check that one package serves both would hold vacuously."""
    from diffusers import ControlNetModel

    for index, folder in enumerate(folders):
        net = ControlNetModel.from_pretrained(folder)
        generator = torch.Generator().manual_seed(index)
        convs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
        with torch.no_grad():
            for conv in convs:
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / math.sqrt(fan_in))
        net.save_pretrained(folder)


def run_child(role: str, module: str, args: argparse.Namespace, work: Path, stages: gpu.Stages) -> None:
    """`role` in a fresh process with an empty inductor cache of its own; each measurement printed."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{module}-{role}")}
    command = [sys.executable, __file__, "--role", role, "--module", module, "--work", str(work)]
    command += ["--device", args.device, "--batch", str(args.batch), "--repeats", str(args.repeats)]
    command += ["--tiny"] * args.tiny
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=max(1.0, stages.left()), check=False
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    for label, value in json.loads(done.stdout.strip().splitlines()[-1]).items():
        gpu.emit(f"{module} {role}: {label}", value, f"{module} {role}: {label}: {value:.4g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the ControlNet only")
    parser.add_argument("--json", action="store_true", help="one JSON object per line, each as it is measured")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny SD 1.5: the code paths on a CPU")
    parser.add_argument("--only", choices=sorted(WAYS), default=None, help="one way to compile, not both")
    parser.add_argument("--batch", type=int, default=2, help="the call's batch: a bucket of 1 with guidance")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, default=540.0, help="seconds after which no step starts")
    parser.add_argument("--role", choices=[role for roles in WAYS.values() for role in roles], help=argparse.SUPPRESS)
    parser.add_argument("--module", choices=MODULES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        print(json.dumps(child(args)))
        return
    gpu.JSON_LINES = args.json
    device, dtype = gpu.bench_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    gpu.emit("device", name, f"device: {name}, dtype {dtype}, torch {torch.__version__}")
    stages = gpu.Stages(args.budget)
    work = Path(tempfile.mkdtemp(prefix="archfarm-aot-bench-"))
    try:
        distinct_controlnets(gpu.build(work, "sd15", 2, args.tiny, device, dtype)[1])
        for module in MODULES[:1] if args.quick else MODULES:
            for role in WAYS[args.only] if args.only else [*WAYS["fleet-cache"], *WAYS["aoti"]]:
                step = f"{module} {role}"
                stages.run(step, lambda role=role, module=module: run_child(role, module, args, work, stages))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
