"""Training benchmark: samples/s and peak memory of `archfarm train` beside a plain loop, same models and data.

    python bench/train.py [--quick] [--json] [--tiny | --full] [--device auto|cpu|cuda]

The plain loop is ControlNet training written as the seed outlines it (and diffusers'
`examples/controlnet/train_controlnet.py` does it): an accelerate `Accelerator` (fp16 mixed precision on
CUDA, none on a CPU), the base loaded with `StableDiffusionPipeline.from_pretrained` and frozen in the
weight dtype, `ControlNetModel.from_unet`, AdamW, a torch DataLoader over the same `metadata.jsonl` decoding
the images with PIL; per batch the target encoded to latents, noised at a random timestep, the ControlNet
and the UNet run, MSE against the noise (or the velocity), backward, step. `archfarm` is
`workers.training.trainer.train` on a spec with the same base, data, resolution, batch, learning rate and
steps (validation off, one checkpoint at the end).

Models: `--tiny` (the default without CUDA) is the `tiny-sd15` preset; `--full` is SD 1.5's published shapes
with random weights (`bench/gpu.py`'s `build`), fp16 on a GPU. Data: synthetic box pairs
(`workers.training.synthetic.write_boxes`) at the training resolution.

Each variant runs in a process of its own, so that its peak memory is its own: the peak resident set on a
CPU (VmHWM: `ru_maxrss` without what a spawned process inherits from this driver), `torch.cuda.
max_memory_allocated` on CUDA; `peak_mb_steps` is the same figure when the last step ended, before archfarm's
final checkpoint and publish. Variants alternate (plain, archfarm, plain, archfarm, ...) and the median of
`--repeats` runs is reported. Throughput is timed over the same window in both: from the end of step
`--warmup` to the end of the last step (model loading, the first steps and archfarm's final checkpoint and
publish are outside it). Read the ratios archfarm/plain, not absolute figures. On a CPU other processes
share, pass `--threads 1`: with as many torch threads as cores, a busy neighbour makes OpenMP's threads wait
on each other and a run's speed varies tenfold from one run to the next.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("plain", "archfarm")
LEARNING_RATE = 1e-5
MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 1e-2
MAX_PAIRS = 256
"""Most pairs written: the data holds one pair per sample a run takes, up to this many."""


# --- one variant, in its own process -------------------------------------------------------------------


class Marks:
    """Wall-clock marks at the end of each optimiser step, and the peak memory when the last step ended."""

    def __init__(self, device: torch.device, total: int) -> None:
        self.device, self.total = device, total
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.peak_steps_mb = 0.0

    def step(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        if len(self.times) == self.total:
            self.peak_steps_mb = peak_mb(self.device)

    def samples_per_s(self, warmup: int, batch: int) -> float:
        if len(self.times) != self.total:
            raise RuntimeError(f"{len(self.times)} steps timed, {self.total} expected")
        return (self.total - warmup) * batch / (self.times[-1] - self.times[warmup - 1])

    def samples_per_cpu_s(self, warmup: int, batch: int) -> float:
        """Samples per second of this process's CPU time over the window: less moved by other processes'
        load than wall time (a diagnostic; on a GPU it is the host's share of the work)."""
        return (self.total - warmup) * batch / (self.cpu_times[-1] - self.cpu_times[warmup - 1])


def peak_mb(device: torch.device) -> float:
    """This process's peak memory so far: device memory allocated by torch on CUDA, resident set on a CPU.

    The resident set's peak is read from /proc (VmHWM, the peak of this process's own address space) where
    there is one: `ru_maxrss` of a spawned process starts from its parent's peak at the spawn, so it would
    report the driver's peak (say, after building a preset) whenever that is the larger."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def run_archfarm(args: argparse.Namespace, device: torch.device, marks: Marks, work: Path) -> None:
    from shared.config import Settings
    from shared.training import TrainingSpec
    from workers.training.trainer import Progress, train

    total = args.warmup + args.steps
    spec = TrainingSpec.from_document(
        {
            "name": "bench",
            "train": {
                "base": args.base,
                "dataset": str(args.data),
                "resolution": args.resolution,
                "batch_size": args.batch,
                "learning_rate": LEARNING_RATE,
                "weight_decay": WEIGHT_DECAY,
                "max_grad_norm": MAX_GRAD_NORM,
                "max_steps": total,
                "checkpoint_every": total,
                "keep_checkpoints": 1,
                "dataloader_workers": 0,
            },
            "output": str(work / "archfarm-out"),
        }
    )
    settings = Settings(device=str(device), models_dir=args.models_dir, storage_url=str(work / "storage"))

    def progress(report: Progress) -> None:
        marks.step()

    train(spec, settings, progress=progress)


class PlainPairs(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """The rows of `metadata.jsonl` decoded with PIL, as the plain script's dataset: the shorter side scaled to
    the resolution (bicubic) and the centre cropped, the image in [-1, 1], the control map in [0, 1], the
    prompt tokenized."""

    def __init__(self, folder: Path, size: int, tokenizer: Any) -> None:
        lines = (folder / "metadata.jsonl").read_text().splitlines()
        self.rows = [json.loads(line) for line in lines if line.strip()]
        self.folder, self.size, self.tokenizer = folder, size, tokenizer

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        ids = self.tokenizer(
            row["text"], padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True
        ).input_ids
        return {
            "pixel_values": self.load(row["image"]) * 2 - 1,
            "conditioning_pixel_values": self.load(row["conditioning_image"]),
            "input_ids": torch.tensor(ids),
        }

    def load(self, name: str) -> torch.Tensor:
        size = self.size
        image = Image.open(self.folder / name).convert("RGB")
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def run_plain(args: argparse.Namespace, device: torch.device, marks: Marks, work: Path) -> None:
    """ControlNet training as the seed outlines it, written plainly."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from torch.utils.data import DataLoader

    from workers.engine.presets import resolve

    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="fp16" if device.type == "cuda" else "no")
    weight_dtype = torch.float16 if accelerator.mixed_precision == "fp16" else torch.float32
    torch.manual_seed(0)

    pipe = StableDiffusionPipeline.from_pretrained(
        resolve(args.base, args.models_dir),
        dtype=weight_dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(accelerator.device, dtype=weight_dtype)
    controlnet = ControlNetModel.from_unet(unet).to(accelerator.device, dtype=torch.float32)
    controlnet.train()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    lr_scheduler = get_scheduler("constant", optimizer)

    loader: DataLoader[dict[str, torch.Tensor]] = DataLoader(
        PlainPairs(Path(args.data), args.resolution, tokenizer),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=0,
    )
    controlnet, optimizer, loader, lr_scheduler = accelerator.prepare(controlnet, optimizer, loader, lr_scheduler)

    def batches() -> Any:
        while True:
            yield from loader

    total = args.warmup + args.steps
    for _, batch in zip(range(total), batches(), strict=False):
        with accelerator.accumulate(controlnet):
            latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            steps = noise_scheduler.config.num_train_timesteps
            timesteps = torch.randint(0, steps, (latents.shape[0],), device=latents.device).long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            embeddings = text_encoder(batch["input_ids"], return_dict=False)[0]
            down, mid = controlnet(
                noisy,
                timesteps,
                encoder_hidden_states=embeddings,
                controlnet_cond=batch["conditioning_pixel_values"].to(dtype=weight_dtype),
                return_dict=False,
            )
            predicted = unet(
                noisy,
                timesteps,
                encoder_hidden_states=embeddings,
                down_block_additional_residuals=[sample.to(dtype=weight_dtype) for sample in down],
                mid_block_additional_residual=mid.to(dtype=weight_dtype),
                return_dict=False,
            )[0]
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            loss = F.mse_loss(predicted.float(), target.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(controlnet.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        loss.detach().item()  # as the script's progress bar: the step's work is done when it returns
        marks.step()
    accelerator.end_training()


RUNNERS: dict[str, Callable[[argparse.Namespace, torch.device, Marks, Path], None]] = {
    "plain": run_plain,
    "archfarm": run_archfarm,
}


def variant(args: argparse.Namespace) -> None:
    """Run one variant in this process and print its figures as JSON on the last line."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    marks = Marks(device, args.warmup + args.steps)
    work = Path(tempfile.mkdtemp(prefix=f"archfarm-train-bench-{args.variant}-"))
    try:
        RUNNERS[args.variant](args, device, marks, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "samples_per_s": marks.samples_per_s(args.warmup, args.batch),
        "samples_per_cpu_s": marks.samples_per_cpu_s(args.warmup, args.batch),
        "peak_mb": peak_mb(device),
        "peak_mb_steps": marks.peak_steps_mb,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result), flush=True)


# --- the driver ------------------------------------------------------------------------------------------


def spawn(args: argparse.Namespace, name: str, base: str, data: Path, models_dir: Path) -> dict[str, float]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--variant",
        name,
        "--base",
        base,
        "--data",
        str(data),
        "--models-dir",
        str(models_dir),
        "--device",
        args.device,
        "--resolution",
        str(args.resolution),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ARCHFARM_MODELS_DIR": str(models_dir)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} variant failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def models(args: argparse.Namespace, device: torch.device, work: Path, models_dir: Path) -> str:
    """The base both variants train against: the tiny preset (built here once), or full-size SD 1.5."""
    if args.tiny:
        from workers.engine.presets import resolve

        resolve("tiny-sd15", models_dir)
        return "tiny-sd15"
    from bench.gpu import build

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    base, _ = build(work, "sd15", 0, False, device, dtype)
    print(f"built random-weight SD 1.5 in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return str(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64², batch 2, 1 + 4 steps, one run per variant")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", dest="tiny", action="store_true", default=None, help="tiny-sd15 (default on CPU)")
    size.add_argument("--full", dest="tiny", action="store_false", help="full-size SD 1.5 (default on CUDA)")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 tiny, 512 full")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20, --quick 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 2, --quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each variant (default 3, --quick 1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of each variant (default torch's; 1 with --quick)"
    )
    parser.add_argument(
        "--models-dir", type=Path, default=None, help="model cache folder (default archfarm's: ARCHFARM_MODELS_DIR)"
    )
    # One variant in this process: how the driver runs each.
    parser.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--base", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant is not None:
        variant(args)
        return

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: use --device cpu")
    if args.tiny is None:
        args.tiny = device.type != "cuda"
    if args.quick:
        args.batch = 2
    args.resolution = args.resolution or (64 if args.tiny or args.quick else 512)
    args.steps = args.steps or (4 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.threads = args.threads or (1 if args.quick else torch.get_num_threads())
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        raise SystemExit("--warmup, --steps and --repeats must be at least 1 (the window starts after a step)")

    from shared.config import Settings
    from workers.training.synthetic import write_boxes

    work = Path(tempfile.mkdtemp(prefix="archfarm-train-bench-"))
    models_dir = args.models_dir or Settings().models_dir  # presets are built once, as for any archfarm run
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        base = models(args, device, work, models_dir)
        data = work / "data"
        write_boxes(data, min(MAX_PAIRS, args.batch * (args.warmup + args.steps)), args.resolution)
        runs: dict[str, list[dict[str, float]]] = {variant_name: [] for variant_name in VARIANTS}
        for repeat in range(args.repeats):
            for variant_name in VARIANTS:
                result = spawn(args, variant_name, base, data, models_dir)
                runs[variant_name].append(result)
                print(
                    f"run {repeat + 1}/{args.repeats} {variant_name:<8} {result['samples_per_s']:8.2f} samples/s "
                    f"({result['samples_per_cpu_s']:.2f} per CPU-s) "
                    f"peak {result['peak_mb']:8.0f} MB (at the last step {result['peak_mb_steps']:.0f} MB)",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results: dict[str, Any] = {
        "device": name,
        "models": "tiny-sd15" if args.tiny else "sd15 (random weights)",
        "precision": "fp16" if device.type == "cuda" else "fp32",
        "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak resident set (VmHWM)",
        "resolution": args.resolution,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": args.threads,
    }
    for variant_name in VARIANTS:
        results[variant_name] = {
            key: median(run[key] for run in runs[variant_name])
            for key in ("samples_per_s", "samples_per_cpu_s", "peak_mb", "peak_mb_steps")
        } | {"runs": [run["samples_per_s"] for run in runs[variant_name]]}
    results["throughput_ratio"] = results["archfarm"]["samples_per_s"] / results["plain"]["samples_per_s"]
    results["memory_ratio"] = results["archfarm"]["peak_mb"] / results["plain"]["peak_mb"]

    print(f"{'variant':<10} {'samples/s':>10} {'peak MB':>10} {'at last step':>13}")
    for variant_name in VARIANTS:
        figures = results[variant_name]
        print(
            f"{variant_name:<10} {figures['samples_per_s']:10.2f} {figures['peak_mb']:10.0f} "
            f"{figures['peak_mb_steps']:13.0f}"
        )
    print(f"throughput archfarm/plain {results['throughput_ratio']:.3f} (target ≥ 1.0)")
    print(f"peak memory archfarm/plain {results['memory_ratio']:.3f} (target ≤ 1.0)")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
