"""`archfarm train` and `archfarm dataset build|check`: training custom ControlNets from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from producer.console import Commands, json_errors, out, print_json, warn
from shared.config import Settings

dataset_app = Commands(
    no_args_is_help=True, help="Training datasets: folders or s3:// prefixes holding metadata.jsonl pairs."
)


@dataset_app.command("build")
def dataset_build(
    images: Annotated[list[str], typer.Argument(metavar="IMAGE", help="Target images: paths, file:// or s3:// URLs.")],
    control: Annotated[str, typer.Option("--control", help="The map to make from each: canny, plan-depth, depth.")],
    out_dir: Annotated[str, typer.Option("--out", help="Dataset folder or s3:// prefix.")],
    resolution: Annotated[int, typer.Option("--resolution", help="Square size of the pairs.")] = 512,
    prompt: Annotated[
        str, typer.Option("--prompt", help="Prompt template; {name} is the image's file name.")
    ] = "an architectural visualisation of {name}",
    captions: Annotated[
        Path | None, typer.Option("--captions", help="CSV with columns image,text: a prompt per image.")
    ] = None,
    depth_model: Annotated[
        str | None, typer.Option("--depth-model", help="DPT model for --control depth (default Intel/dpt-large).")
    ] = None,
) -> None:
    """Make a training dataset from images: each image, its control map by archfarm's own preprocessor, and
    a prompt, as metadata.jsonl rows (the layout of diffusers' ControlNet training script)."""
    from workers.training.build import build, read_captions

    built = build(
        images,
        control,
        out_dir,
        Settings(),
        resolution=resolution,
        prompt=prompt,
        captions=None if captions is None else read_captions(captions),
        depth_model=depth_model,
    )
    for line in built.skipped:
        warn(f"skipped {line}")
    if built.uncaptioned:
        warn(f"{built.uncaptioned} images had no caption: given the --prompt template")
    out.print(f"{built.pairs} pairs → {out_dir}", markup=False)


@dataset_app.command("check")
def dataset_check(
    dataset: Annotated[str, typer.Argument(help="Dataset folder or s3:// prefix.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Report, row by row, missing files, unreadable or mismatched images and empty prompts. Exit 1 when any
    row is bad (training skips and counts such rows rather than stopping)."""
    json_errors.set(as_json)
    from workers.training.dataset import Dataset

    data = Dataset(dataset, Settings())
    problems = list(data.check())
    rows = len(data.rows) + len(data.problems)
    if as_json:
        print_json({"rows": rows, "bad": [{"row": p.row, "reason": p.reason} for p in problems]})
    else:
        for problem in problems:
            out.print(str(problem), markup=False)
        out.print(f"{rows} rows, {rows - len(problems)} good, {len(problems)} bad", markup=False)
    if problems:
        raise typer.Exit(1)


def train(
    spec_file: Annotated[Path, typer.Argument(help="Training spec YAML or JSON file.")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the output's latest checkpoint.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")] = False,
) -> None:
    """Train a ControlNet in this process (`accelerate launch -m producer.cli train ...` for several GPUs):
    checkpoints, validation images, metrics and the model go under the spec's output."""
    json_errors.set(as_json)
    from shared.training import load_training
    from workers.training.trainer import train as run

    spec = load_training(spec_file)
    with _Bar(spec.train.max_steps, interactive=out.is_terminal, quiet=as_json) as bar:
        result = run(spec, Settings(), resume=resume, progress=bar.update)
    for problem in result.skipped:
        warn(f"dataset {spec.train.dataset}: skipped {problem}")
    summary = {
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "final_loss": result.final_loss,
        "skipped_rows": len(result.skipped),
        "model": result.model_url,
        "model_sha256": result.model_sha256,
    }
    if as_json:
        print_json(summary)
    else:
        out.print(f"{result.steps} steps, loss {result.final_loss:.4f} → {result.model_url}", markup=False)


class _Bar:
    """Steps with loss, samples/s and ETA on a terminal; a line at every tenth of the run otherwise; nothing
    when `quiet` (--json: stdout is the one JSON document)."""

    def __init__(self, total: int, interactive: bool, quiet: bool) -> None:
        self.total, self.interactive, self.quiet = total, interactive and not quiet, quiet
        self.progress = Progress(
            TextColumn("training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  {task.fields[rate]} samples/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=out,
            disable=not self.interactive,
        )
        self.bar = self.progress.add_task("training", total=total, loss="?", rate="?")

    def __enter__(self) -> _Bar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def update(self, report: object) -> None:
        from workers.training.trainer import Progress as Step

        assert isinstance(report, Step)  # the trainer's own type
        self.progress.update(
            self.bar, completed=report.step, loss=f"{report.loss:.4f}", rate=f"{report.samples_per_s:.1f}"
        )
        if not (self.interactive or self.quiet) and report.step % max(1, self.total // 10) == 0:
            out.print(
                f"step {report.step}/{report.max_steps} loss {report.loss:.4f} lr {report.lr:.2e} "
                f"{report.samples_per_s:.1f} samples/s, {report.skipped_rows} bad rows skipped",
                markup=False,
            )
