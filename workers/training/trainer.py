"""`archfarm train`: a ControlNet trained beside a frozen base, on one device or many (`accelerate launch`).

As the seed outlines it and diffusers' `train_controlnet.py` does it: each target image is encoded to
latents by the frozen VAE, noised at a random timestep, and the frozen UNet, steered by the ControlNet's
residuals from the control map, predicts the noise; the MSE between prediction and noise is backpropagated
through the ControlNet only. The base runs in half precision on a GPU; the ControlNet keeps fp32 master
weights (mixed precision by accelerate).

Everything random is a function of the seed and the position in the run (the data order of an epoch, the
noise of a step), never of a generator's history, so a run resumed from a checkpoint takes exactly the
steps the uninterrupted run would: on a CPU the final weights are bitwise the same.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from torch.utils.data import DataLoader

from shared.config import Settings
from shared.errors import ArchfarmError, ConfigError, InvalidInput
from shared.images import decode_image
from shared.licences import licence_key
from shared.published import publish
from shared.registry import default_controlnet
from shared.storage import Storages
from shared.training import TrainingSpec, model_url
from workers.engine.models import ModelCache, pick_device
from workers.engine.pipeline import Item, Request, Unit, render_batch
from workers.engine.presets import resolve
from workers.training import checkpoints
from workers.training.dataset import Dataset, Pair, Problem

log = logging.getLogger(__name__)

SPEC = "spec.json"
METRICS = "metrics.csv"
_METRIC_FIELDS = ("step", "loss", "lr", "samples_per_s", "skipped_rows")


@dataclass(frozen=True)
class Progress:
    step: int
    max_steps: int
    loss: float
    lr: float
    samples_per_s: float
    skipped_rows: int


@dataclass(frozen=True)
class Result:
    steps: int
    resumed_from: int | None
    model_url: str
    model_sha256: str
    skipped: list[Problem]
    final_loss: float | None


ProgressFn = Callable[[Progress], None]
"""Called after every optimiser step on the main process; may raise to stop the run (a cancel)."""


@dataclass
class RunState:
    """What a checkpoint records beside accelerate's own state: where the run is in its steps and its data."""

    step: int = 0
    position: int = 0
    """Samples of the global data order consumed by all processes together."""
    skipped: dict[int, str] = field(default_factory=dict)
    """Bad rows met so far (row number → reason), each counted once."""

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "position": self.position, "skipped": json.dumps(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.position = int(state["step"]), int(state["position"])
        self.skipped = {int(k): v for k, v in json.loads(state["skipped"]).items()}


def train(
    spec: TrainingSpec, settings: Settings, *, resume: bool = False, progress: ProgressFn | None = None
) -> Result:
    """Run `spec` to its last step, from its latest checkpoint when `resume` (a fresh start when there is
    none), and publish the ControlNet under the output. Refuses an output holding another run's checkpoints."""
    with tempfile.TemporaryDirectory(prefix="archfarm-train-") as logs:
        return _Run(spec, settings, Path(logs)).run(resume, progress)


class _Run:
    def __init__(self, spec: TrainingSpec, settings: Settings, logs: Path) -> None:
        self.spec, self.cfg, self.settings = spec, spec.train, settings
        self.storages = Storages(settings)
        self.out = self.storages.open(spec.output)
        device = pick_device(settings.device)
        if self.cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError('report_to: tensorboard needs the tensorboard package (pip install "archfarm[train]")')
        precision = self.cfg.mixed_precision
        if precision == "auto":
            precision = "fp16" if device.type == "cuda" else "no"
        self.accelerator = Accelerator(
            cpu=device.type == "cpu",
            mixed_precision=precision,
            gradient_accumulation_steps=self.cfg.gradient_accumulation,
            log_with="tensorboard" if self.cfg.report_to == "tensorboard" else None,
            project_dir=str(logs),  # TensorBoard's event files, uploaded with each checkpoint
        )
        # The frozen base in the training precision: fp16/bf16 halves its memory and time; fp32 without it.
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        self.cache = ModelCache(
            settings.models_dir,
            self.accelerator.device,
            self.weight_dtype,
            controlnet_budget_bytes=0,  # validation loads each snapshot once; none is kept
            offload_budget_bytes=0,
        )
        self.dataset = Dataset(self.cfg.dataset, settings)
        if not self.dataset.rows:
            raise InvalidInput(f"dataset {self.cfg.dataset}: no usable rows ({len(self.dataset.problems)} bad)")
        self.state = RunState()
        self.metrics: list[dict[str, Any]] = []

    # --- the run -----------------------------------------------------------------------------------------

    def run(self, resume: bool, progress: ProgressFn | None) -> Result:
        cfg, accelerator = self.cfg, self.accelerator
        if self.cache.family(cfg.base) != "sd15":
            raise InvalidInput(f"train.base: {cfg.base!r} is an SDXL model; training supports SD 1.5 bases")
        base = self.cache.base(cfg.base)
        for name in ("unet", "vae", "text_encoder"):
            base[name].requires_grad_(False)
        controlnet = self._init_lora(base["unet"]) if cfg.target == "lora" else self._init_controlnet(base["unet"])
        optimizer = self._optimizer(controlnet)
        schedule = get_scheduler(
            cfg.lr_schedule,
            optimizer,
            num_warmup_steps=cfg.warmup_steps * accelerator.num_processes,
            num_training_steps=cfg.max_steps * accelerator.num_processes,
        )
        controlnet, optimizer, schedule = accelerator.prepare(controlnet, optimizer, schedule)
        accelerator.register_for_checkpointing(self.state)
        resumed = self._start(resume)
        if cfg.report_to == "tensorboard":
            accelerator.init_trackers(self.spec.name)
        noise_scheduler = DDPMScheduler.from_config(base["scheduler"].config)
        batches = self._batches()
        started, first_step = time.perf_counter(), self.state.step
        loss_value: float | None = None
        while self.state.step < cfg.max_steps:
            losses = []
            for _ in range(cfg.gradient_accumulation):
                pairs = next(batches)
                with accelerator.accumulate(controlnet):
                    loss = self._loss(base, controlnet, noise_scheduler, pairs)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(_trained(controlnet), cfg.max_grad_norm)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            self.state.step += 1
            loss_value = float(accelerator.reduce(torch.stack(losses).mean(), reduction="mean"))
            rate = (self.state.step - first_step) * self._samples_per_step() / (time.perf_counter() - started)
            report = Progress(
                self.state.step, cfg.max_steps, loss_value, schedule.get_last_lr()[0], rate, len(self.state.skipped)
            )
            self._record(report)
            if accelerator.is_main_process and progress is not None:
                progress(report)
            if self.state.step % cfg.checkpoint_every == 0 or self.state.step == cfg.max_steps:
                self._checkpoint()
            if cfg.validation is not None and self.state.step % cfg.validation.every == 0:
                self._validate(accelerator.unwrap_model(controlnet))
        accelerator.end_training()
        url, digest = self._publish(accelerator.unwrap_model(controlnet))
        skipped = [Problem(row, reason) for row, reason in sorted(self.state.skipped.items())]
        return Result(self.state.step, resumed, url, digest, skipped, loss_value)

    def _init_controlnet(self, unet: torch.nn.Module) -> ControlNetModel:
        """fp32 master weights, whatever precision the frozen base runs in."""
        if self.cfg.init == "base":
            # The hint encoder starts from random weights: drawn from the seed, so runs are repeatable.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                controlnet = ControlNetModel.from_unet(unet)  # a new module: fp32 whatever the UNet's dtype
        else:
            location = resolve(self.cfg.init, self.settings.models_dir)
            controlnet = ControlNetModel.from_pretrained(location, dtype=torch.float32)
        controlnet.to(self.accelerator.device)
        controlnet.train()
        if self.cfg.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        return controlnet

    def _init_lora(self, unet: torch.nn.Module) -> torch.nn.Module:
        """The base's UNet with a LoRA (`target: lora`) on its attention projections and its resnets' convolutions
        (attention alone barely moves a look's colours and textures): its down-projections drawn from the seed,
        its up-projections zero (it starts as a no-op), trained in fp32 whatever the UNet's dtype. The trained
        module is the UNet itself; only the LoRA's parameters take gradients."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"]
            config = LoraConfig(
                r=self.cfg.rank, lora_alpha=self.cfg.rank, init_lora_weights="gaussian", target_modules=targets
            )
            unet.add_adapter(config)  # type: ignore[operator]
        for parameter in _trained(unet):
            parameter.data = parameter.data.float()
        unet.train()
        if self.cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()  # type: ignore[operator]
        return unet

    def _optimizer(self, controlnet: torch.nn.Module) -> torch.optim.Optimizer:
        """The whole parameter list in one kernel per operation (fused on CUDA, foreach elsewhere), instead of
        torch's CPU default of a loop over ~300 tensors: measured 4 ms of a 44 ms tiny CPU step."""
        params, cfg = _trained(controlnet), self.cfg
        fused = self.accelerator.device.type == "cuda"
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(
                params,
                lr=cfg.learning_rate,
                momentum=0.9,
                weight_decay=cfg.weight_decay,
                fused=fused,
                foreach=not fused,
            )
        return torch.optim.AdamW(
            params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=fused, foreach=not fused
        )

    def _loss(
        self, base: dict[str, Any], controlnet: torch.nn.Module, noise_scheduler: DDPMScheduler, pairs: Pairs
    ) -> torch.Tensor:
        device, dtype = self.accelerator.device, self.weight_dtype
        vae, count = base["vae"], len(pairs.texts)
        # The step's randomness from (seed, process, data position) alone: resuming needs no generator
        # history. All drawn on the CPU before any work is queued on the device, then copied over together,
        # so the device never waits for the host in the middle of a step.
        generator = _generator(self.cfg.seed, self.accelerator.process_index, self.state.position)
        dropped = torch.rand(count, generator=generator) < self.cfg.empty_prompts
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        height, width = pairs.images.shape[-2] // scale, pairs.images.shape[-1] // scale
        noise = torch.randn((count, vae.config.latent_channels, height, width), generator=generator)
        if self.cfg.timesteps is None:
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (count,), generator=generator)
        else:
            timesteps = torch.tensor(self.cfg.timesteps)[
                torch.randint(0, len(self.cfg.timesteps), (count,), generator=generator)
            ]
        tokens = base["tokenizer"](
            ["" if drop else text for text, drop in zip(pairs.texts, dropped.tolist(), strict=True)],
            padding="max_length",
            max_length=base["tokenizer"].model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        images, conditioning = pairs.images.to(device, dtype), pairs.conditioning.to(device, dtype)
        noise, timesteps, tokens = noise.to(device, dtype), timesteps.to(device), tokens.to(device)
        with torch.no_grad():
            # The posterior's mode: a trained VAE's posterior is narrow (sampling it changes little), and an
            # untrained one's is wide enough to drown the image in noise.
            latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
            embeddings = base["text_encoder"](tokens)[0]
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if self.cfg.target == "lora":  # `controlnet` is the UNet itself, with its LoRA
            predicted = controlnet(noisy, timesteps, encoder_hidden_states=embeddings, return_dict=False)[0]
            return F.mse_loss(predicted.float(), self._target(noise_scheduler, latents, noise, timesteps).float())
        down, mid = controlnet(
            noisy,
            timesteps,
            encoder_hidden_states=embeddings,
            controlnet_cond=conditioning,
            return_dict=False,
        )
        predicted = base["unet"](
            noisy,
            timesteps,
            encoder_hidden_states=embeddings,
            down_block_additional_residuals=[residual.to(dtype) for residual in down],
            mid_block_additional_residual=mid.to(dtype),
            return_dict=False,
        )[0]
        return F.mse_loss(predicted.float(), self._target(noise_scheduler, latents, noise, timesteps).float())

    @staticmethod
    def _target(
        scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the UNet learns to predict: the velocity for a v-prediction base, else the noise."""
        if scheduler.config.prediction_type == "v_prediction":
            return scheduler.get_velocity(latents, noise, timesteps)
        return noise

    # --- data --------------------------------------------------------------------------------------------

    def _samples_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.gradient_accumulation * self.accelerator.num_processes

    def _batches(self) -> Iterator[Pairs]:
        """Micro-batches of this process from the run's position on; bad rows dropped from their batch and
        counted (a batch of only bad rows is skipped)."""
        cfg, accelerator = self.cfg, self.accelerator
        sampler = _Order(
            len(self.dataset.rows), cfg.seed, cfg.batch_size, accelerator.process_index, accelerator.num_processes
        )
        loader = DataLoader(
            _Decoded(self.dataset, cfg.resolution),
            batch_sampler=sampler.from_position(self.state.position),
            num_workers=cfg.dataloader_workers,
            collate_fn=_collate,
            persistent_workers=False,
        )
        for pairs in loader:  # endless: the order never runs dry
            self.state.position += cfg.batch_size * accelerator.num_processes
            for problem in pairs.problems:
                if problem.row not in self.state.skipped:
                    log.warning("dataset %s: skipping %s", cfg.dataset, problem)
                    self.state.skipped[problem.row] = problem.reason
            if len(pairs.texts):
                yield pairs
        raise AssertionError("the data order ended")

    # --- checkpoints, metrics, validation, result -------------------------------------------------------

    def _start(self, resume: bool) -> int | None:
        """Load the latest checkpoint when resuming; refuse to mix two runs in one output."""
        done = checkpoints.complete(self.out)
        recorded = self.out.get(SPEC) if self.out.exists(SPEC) else None
        if recorded is not None and json.loads(recorded).get("digest") != self.spec.digest():
            raise InvalidInput(f"{self.spec.output} holds a run of another training spec; choose another output")
        if done and not resume:
            raise InvalidInput(
                f"{self.spec.output} already holds checkpoints up to step {done[-1]}: resume it (--resume) or choose "
                "another output"
            )
        if self.accelerator.is_main_process:
            body = {"digest": self.spec.digest(), "spec": self.spec.model_dump(mode="json")}
            self.out.put(SPEC, json.dumps(body, indent=2).encode(), "application/json")
        if not done:
            return None
        with tempfile.TemporaryDirectory() as scratch:
            self.accelerator.load_state(str(checkpoints.load(self.out, done[-1], Path(scratch) / "state")))
        self.metrics = [row for row in self._stored_metrics() if int(row["step"]) <= self.state.step]
        log.info("resumed %s from step %d", self.spec.name, self.state.step)
        return done[-1]

    def _checkpoint(self) -> None:
        accelerator = self.accelerator
        with tempfile.TemporaryDirectory() as scratch:
            accelerator.save_state(scratch, safe_serialization=True)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                # Metrics first: a checkpoint marked complete then always has its rows stored (a resume drops
                # any rows past the step it resumes from).
                self._write_metrics()
                checkpoints.save(self.out, self.state.step, Path(scratch))
                checkpoints.prune(self.out, self.cfg.keep_checkpoints)

    def _record(self, report: Progress) -> None:
        row = {name: getattr(report, name) for name in _METRIC_FIELDS}
        self.metrics.append(row)
        if self.cfg.report_to == "tensorboard":
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=report.step)

    def _write_metrics(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=_METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(self.metrics)
        self.out.put(METRICS, text.getvalue().encode(), "text/csv")
        if self.cfg.report_to == "tensorboard":
            logs = Path(self.accelerator.project_dir)
            for path in (p for p in logs.rglob("*") if p.is_file()):
                self.out.put("tensorboard/" + path.relative_to(logs).as_posix(), path.read_bytes())

    def _stored_metrics(self) -> list[dict[str, Any]]:
        if not self.out.exists(METRICS):
            return []
        return list(csv.DictReader(io.StringIO(self.out.get(METRICS).decode())))

    def _validate(self, controlnet: torch.nn.Module) -> None:
        """Render the fixed prompts and maps with the engine farm workers use, from this step's weights."""
        validation = self.cfg.validation
        if validation is None or not self.accelerator.is_main_process:
            return
        size = self.cfg.resolution
        maps = [self._validation_map(url, size) for url in validation.images]
        items = [
            Item(prompt, "", validation.seed, (maps[index % len(maps)],))
            for index, prompt in enumerate(validation.prompts)
        ]
        with tempfile.TemporaryDirectory() as scratch:
            if self.cfg.target == "lora":  # the UNet renders with its LoRA, steered by the base's canny ControlNet
                family = self.cache.family(self.cfg.base)
                net = default_controlnet(self.cfg.base, "canny", family)
            else:
                controlnet.save_pretrained(scratch, safe_serialization=True)  # type: ignore[operator]
                net = scratch
            result = render_batch(
                self.cache,
                Request(
                    base=self.cfg.base,
                    units=[Unit(net, 1.0, 0.0, 1.0)],
                    items=items,
                    steps=validation.steps,
                    guidance_scale=validation.guidance_scale,
                    width=size,
                    height=size,
                ),
            )
        for index, image in enumerate(result.images):
            assert isinstance(image, Image.Image)  # render_batch's default output type
            data = io.BytesIO()
            image.save(data, format="PNG")
            self.out.put(f"validation/step-{self.state.step:08d}/{index}.png", data.getvalue(), "image/png")
        controlnet.train()

    def _validation_map(self, url: str, size: int) -> Image.Image:
        # Imported here: the preprocessors package brings OpenCV and the depth models (25 MB resident) into
        # every training process otherwise, for a few validation maps.
        from workers.preprocessors.resize import fit_and_pad

        data = self.storages.read(url)
        image = decode_image(data, url, max_pixels=self.settings.max_image_pixels)
        return Image.fromarray(fit_and_pad(np.asarray(image.convert("RGB")), size, size))

    def _publish(self, controlnet: torch.nn.Module) -> tuple[str, str]:
        """Publish the result under the output's model URL; a LoRA's URL is its weights file's, what a style
        pack names (`archfarm styles add --lora URL`)."""
        url = model_url(self.spec.output)
        with tempfile.TemporaryDirectory() as scratch:
            if self.cfg.target == "lora":
                layers = get_peft_model_state_dict(controlnet)
                StableDiffusionPipeline.save_lora_weights(scratch, unet_lora_layers=layers, safe_serialization=True)
                url = f"{url.rstrip('/')}/{LORA_WEIGHTS}"
            else:
                controlnet.save_pretrained(scratch, safe_serialization=True)  # type: ignore[operator]
            # Copied from its base's UNet, the ControlNet is a derivative of the base: it declares the base's licence.
            licence = licence_key(self.cfg.base)
            main = self.accelerator.is_main_process
            digest = publish(Path(scratch), model_url(self.spec.output), self.settings, licence) if main else ""
        return url, digest


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""The file diffusers saves a LoRA's weights in."""


def _trained(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a run updates: all of a ControlNet's, a LoRA's alone in the UNet it adapts."""
    return [parameter for parameter in module.parameters() if parameter.requires_grad]


def _generator(*numbers: int) -> torch.Generator:
    """A CPU generator seeded from `numbers` alone, the same in every Python (unlike `hash`)."""
    digest = hashlib.sha256(",".join(map(str, numbers)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@dataclass(frozen=True)
class Pairs:
    """A micro-batch: the good pairs stacked, and the bad rows met on the way."""

    images: torch.Tensor
    conditioning: torch.Tensor
    texts: Sequence[str]
    problems: Sequence[Problem]


class _Decoded(torch.utils.data.Dataset[Pair | Problem]):
    """Rows decoded at the training resolution; a bad row is its `Problem` instead of an exception."""

    def __init__(self, dataset: Dataset, resolution: int) -> None:
        self.dataset, self.resolution = dataset, resolution

    def __len__(self) -> int:
        return len(self.dataset.rows)

    def __getitem__(self, index: int) -> Pair | Problem:
        row = self.dataset.rows[index]
        try:
            return self.dataset.pair(row, self.resolution)
        except ArchfarmError as error:
            return Problem(row.number, str(error))


def _collate(items: list[Pair | Problem]) -> Pairs:
    good = [item for item in items if isinstance(item, Pair)]
    problems = [item for item in items if isinstance(item, Problem)]
    if not good:
        empty = torch.empty(0)
        return Pairs(empty, empty, (), problems)
    return Pairs(
        torch.stack([p.image for p in good]),
        torch.stack([p.conditioning for p in good]),
        [p.text for p in good],
        problems,
    )


@dataclass(frozen=True)
class _Order:
    """The data order: each epoch a permutation drawn from (seed, epoch); process `rank` of `world` takes the
    rank-th `batch` of every `world` batches. Endless, so a run of any length never runs dry."""

    rows: int
    seed: int
    batch: int
    rank: int
    world: int

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.rows, generator=generator).tolist()

    def from_position(self, position: int) -> Iterator[list[int]]:
        epoch, cached = -1, []
        while True:
            start = position + self.rank * self.batch
            batch = []
            for sample in range(start, start + self.batch):
                if sample // self.rows != epoch:
                    epoch = sample // self.rows
                    cached = self.permutation(epoch)
                batch.append(cached[sample % self.rows])
            yield batch
            position += self.batch * self.world
