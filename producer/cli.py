"""`archfarm`: the command line. Errors the user can fix print one line and exit non-zero, no traceback."""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from producer.console import Commands, err, out
from producer.console import fail as _fail
from producer.console import json_errors as _json_errors
from producer.console import print_json as _print_json
from producer.console import warn as _warn
from producer.models import every_model
from producer.styles_cli import styles_app
from producer.training_cli import dataset_app
from producer.training_cli import train as train_command
from shared.config import DEFAULT_POOL, Settings
from shared.db.models import JobKind, TaskStatus
from shared.db.status import JobStatus
from shared.errors import SubmitWarning
from shared.kinds import Packs, load_spec
from shared.licences import licence_of
from shared.packs import load_pack
from shared.profiles import BUILTIN
from shared.registry import known_family
from shared.spec import NAME_PATTERN, JobSpec, Profile, Style, load_job, load_profile, parse_model
from shared.storage import Storages
from shared.styles import CATALOG

if TYPE_CHECKING:
    from producer.views import JobView, TrainingProgress

app = Commands(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's own help: typer's rich panels show every flag as `--wait <bool>`, as if it took a value.
    rich_markup_mode=None,
    help="Batch-render floor plans with ControlNet.",
)
db_app = Commands(no_args_is_help=True, help="State database.")
app.add_typer(db_app, name="db")
token_app = Commands(no_args_is_help=True, help="REST API tokens (run where ARCHFARM_DATABASE_URL reaches).")
app.add_typer(token_app, name="token")


JobId = Annotated[
    str, typer.Argument(metavar="JOB", help="A job's id, or its first characters (at least 4, as the dashboard shows).")
]


def _version(value: bool) -> None:
    if value:
        out.print(f"archfarm {version('archfarm')}", markup=False)
        raise typer.Exit()


@app.callback()
def _setup(
    _: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """archfarm's own warnings (`SubmitWarning`) are one line on stderr, like its errors; Pillow's are not
    shown at all (archfarm refuses what it must in its own words: a bomb's warning would precede the refusal)."""
    _json_errors.set(False)  # a program may invoke several commands in one process
    warnings.filterwarnings("ignore", module="PIL")

    library = warnings.showwarning
    if getattr(library, "archfarm", False):  # already in place (a program invoking the CLI repeatedly)
        return

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, SubmitWarning):
            _warn(str(message))
        else:
            library(message, category, *args, **kwargs)

    show.archfarm = True  # type: ignore[attr-defined]
    warnings.showwarning = show


def _render_spec(
    plans: list[str],
    styles: list[str],
    seeds: int | None,
    seed: list[int],
    profile: str | None,
    out_dir: Path | None,
    job_file: Path | None,
    packs: Packs,
) -> JobSpec:
    if job_file is not None:
        if plans or styles or seeds is not None or seed:
            _fail("--job takes the plans, styles and seeds from the file; do not give them too")
        spec = load_job(job_file, packs)
        if profile is not None:
            spec = spec.model_copy(update={"profile": load_profile(profile)})
        return spec if out_dir is None else spec.model_copy(update={"output": str(out_dir.resolve())})
    if not plans:
        _fail("give at least one PLAN (or --job JOB.yaml)")
    if not styles:
        _fail("give at least one --style")
    if (seeds is None) == (not seed):
        _fail("give either --seeds N or one or more --seed S")
    return parse_model(
        JobSpec,
        {
            "name": "render",
            "plans": plans,
            "styles": styles,
            "seeds": {"count": seeds} if seeds is not None else seed,
            "profile": load_profile(profile or "tiny"),
            "output": str((out_dir or Path("renders")).resolve()),
        },
        context={"packs": packs},
    )


@app.command()
def render(
    plans: Annotated[
        list[str] | None, typer.Argument(metavar="PLAN", help="Plan images: paths, file:// or s3:// URLs.")
    ] = None,
    style: Annotated[
        list[str] | None,
        typer.Option(
            "--style", metavar="NAME", help=f"A built-in style ({', '.join(CATALOG)}; `archfarm styles`); repeatable."
        ),
    ] = None,
    seeds: Annotated[int | None, typer.Option("--seeds", metavar="N", help="Render seeds 0..N-1.")] = None,
    seed: Annotated[
        list[int] | None, typer.Option("--seed", metavar="SEED", help="An explicit seed; repeatable.")
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            help=f"A built-in profile ({', '.join(BUILTIN)}; `archfarm profiles`) or a YAML file (default: tiny).",
        ),
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default ./renders).")] = None,
    job_file: Annotated[Path | None, typer.Option("--job", help="A whole job YAML/JSON file.")] = None,
    save_maps: Annotated[
        bool, typer.Option("--save-maps", help="Also write each plan's control maps under OUT/maps (see `maps`).")
    ] = False,
) -> None:
    """Render every plan × style × seed in this process and write PNGs with JSON sidecars."""
    from producer.local import render_local

    settings = Settings()

    def packs(name: str) -> Style | None:
        return load_pack(Storages(settings).open(), name)

    spec = _render_spec(plans or [], style or [], seeds, seed or [], profile, out_dir, job_file, packs)
    if save_maps:
        _write_maps(spec.plans, spec.profile, Path(spec.output or settings.storage_url) / "maps", settings)
    reporter = _Reporter(interactive=out.is_terminal)
    started = time.perf_counter()
    with reporter:
        report = render_local(
            spec, settings, on_prepared=reporter.start, on_task_done=reporter.task_done, progress=reporter.step
        )
    elapsed = time.perf_counter() - started
    total = sum(map(reporter.images, report.statuses))
    written = sum(map(reporter.images, report.succeeded))
    count = f"{written} images" if written == total else f"{written} of {total} images"
    out.print(f"job {report.job_id}: {count} in {elapsed:.1f} s → {report.output_url}", markup=False)
    if spec.pick is not None and spec.pick.by == "hand" and report.ok:
        out.print(
            f"drafts ready; pick the ones to finish: `archfarm results {report.job_id}` lists them with their ids and "
            f"adherence, `archfarm pick {report.job_id} ID...` renders their finals, `archfarm pick {report.job_id} "
            "--done` ends the job",
            markup=False,
        )
    if not report.ok:
        for task_id, error in report.errors.items():
            err.print(f"task {task_id} failed: {error}", markup=False, soft_wrap=True)
        _fail(f"{len(report.errors)} of {len(report.statuses)} tasks failed", code=1)


@app.command()
def maps(
    plans: Annotated[list[str], typer.Argument(metavar="PLAN", help="Plan images: paths, file:// or s3:// URLs.")],
    profile: Annotated[
        str, typer.Option("--profile", help="A built-in profile or a YAML file (default: tiny).")
    ] = "tiny",
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("maps"),
) -> None:
    """Write each control unit's map for each plan exactly as the ControlNets get it (render size, padding):
    OUT/PLAN/N-KIND.png. A nearly empty map is also a warning."""
    _write_maps(plans, load_profile(profile), out_dir, Settings())


def _write_maps(plans: list[str], profile: Profile, out_dir: Path, settings: Settings) -> None:
    from workers.maps import write_maps

    for written in write_maps(plans, profile, out_dir, settings):
        note = f" (nearly empty: {written.empty})" if written.empty else ""
        out.print(f"{written.plan} unit {written.unit} {written.kind}: {written.path}{note}", markup=False)


@app.command()
def rerender(
    sidecar: Annotated[Path, typer.Argument(help="The JSON sidecar written beside an image.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the new image.")] = Path("rerendered"),
) -> None:
    """Render an image again from its sidecar (bitwise identical on a CPU): prints where it is written and
    whether it is identical to the original, or by how much it differs."""
    from producer.rerender import rerender as rerender_image

    result = rerender_image(sidecar, out_dir, Settings())
    for name in result.model_changes:
        _warn(f"model {name} has other weights than when the image was made")
    if result.shared_call:
        _warn(
            f"the image shared its pipeline call with {result.shared_call} other task(s): rendered alone, it "
            "matches within 1/255, not bitwise"
        )
    out.print(str(result.image), markup=False)
    out.print(result.verdict, markup=False)


class _Reporter:
    """A progress bar on a terminal, one plain line per finished task otherwise (logs, CI, pipes)."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self.tasks: dict[str, tuple[int, ...]] = {}
        self.done = 0
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=out,
            disable=not interactive,
        )
        self.bar = self.progress.add_task("rendering", total=None)

    def __enter__(self) -> _Reporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    def start(self, job) -> None:  # type: ignore[no-untyped-def]
        self.tasks = {t.id: t.seeds for t in job.tasks}
        self.names = {t.id: f"{t.plan.name}/{t.style}" for t in job.tasks}
        self.total = len(job.tasks)
        self.progress.update(self.bar, total=sum(len(s) for s in self.tasks.values()))
        if not self.interactive:
            out.print(f"job {job.id}: {self.total} tasks → {job.output_url}", markup=False)

    def step(self, task_id: str, step: int, total: int) -> None:
        self.progress.update(self.bar, description=f"{self.names.get(task_id, 'final')} step {step}/{total}")

    def images(self, task_id: str) -> int:
        """A task's images: its seeds, or one for a final its drafts led to (not known in advance)."""
        return len(self.tasks.get(task_id, ())) or 1

    def task_done(self, task_id: str, status: TaskStatus) -> None:
        """A task of the job as submitted, or a final its drafts led to."""
        self.done += 1
        seeds = self.tasks.get(task_id)
        self.progress.advance(self.bar, self.images(task_id))
        if self.interactive:
            return
        what = f"final {task_id[:8]}" if seeds is None else f"{self.names[task_id]} seeds {','.join(map(str, seeds))}"
        out.print(f"[{self.done}/{max(self.total, self.done)}] {what}: {status.value}", markup=False)


def _farm():  # type: ignore[no-untyped-def]
    from producer.client import Farm

    return Farm(Settings())


@app.command()
def submit(
    job_file: Annotated[Path, typer.Argument(help="Job YAML or JSON file.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the job has finished.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Validate a job, store it with its tasks in one transaction, print its id, then enqueue the tasks.

    A broker that is down does not lose the job: it is stored, its id printed, and the workers send its tasks
    once the broker is back (a warning says so). Without a broker configured (ARCHFARM_BROKER_URL) the job
    renders in this process before its id is printed, as `archfarm render --job` would (a warning says so)."""
    _json_errors.set(as_json)

    def stored(job_id: str, tasks: int) -> None:
        if not as_json:
            out.print(job_id, markup=False)

    with _farm() as farm:
        spec = load_spec(job_file, farm.pack)
        if not farm.settings.broker_url and spec.kind == JobKind.RENDER:
            _warn(
                "no broker configured (ARCHFARM_BROKER_URL): rendering the job in this process now, as "
                f"`archfarm render --job {job_file}` would, into {farm.settings.storage_url}"
            )
        job_id = farm.submit(spec, on_stored=stored)
        view = farm.wait(job_id) if wait else farm.status(job_id)
    if as_json:
        _print_json(view.model_dump(mode="json"))
    elif wait:
        out.print(f"{job_id} {view.status.value}", markup=False)
    if wait and view.status.value != "succeeded":
        raise typer.Exit(1)


@app.command()
def status(
    job_id: Annotated[
        str | None,
        typer.Argument(help="A job's id, or its first characters (at least 4); all recent jobs when omitted."),
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the job until it finishes.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """One job with per-state task counts, ETA and a progress bar, or a table of recent jobs."""
    _json_errors.set(as_json)
    with _farm() as farm:
        if job_id is None:
            views = farm.jobs()
            if as_json:
                _print_json([v.model_dump(mode="json") for v in views])
            else:
                for v in views:
                    line = f"{v.id}  {v.status.value:<20} {v.rendered}/{v.total} rendered  {v.name}"
                    out.print(line, markup=False)
            return
        job_id = farm.resolve(job_id)
        view = farm.status(job_id)
        if watch and not as_json:
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"),
                console=out,
                disable=not out.is_terminal,
            ) as bar:
                task = bar.add_task(view.status.value, total=view.total, completed=view.done, eta="?")
                while not view.status.still:
                    time.sleep(1.0)
                    view = farm.status(job_id)
                    eta = "?" if view.eta_s is None else f"{view.eta_s:.0f}s"
                    bar.update(task, completed=view.done, description=view.status.value, eta=eta)
        elif watch:
            view = farm.wait(job_id)
    if as_json:
        _print_json(view.model_dump(mode="json"))
        return
    out.print(f"{view.id} {view.name}: {_summary(view)}", markup=False)
    for measured in view.consistency:
        strays = f", outliers {', '.join(map(str, measured.outliers))}" if measured.outliers else ""
        stage = "" if measured.stage == "render" else f" ({measured.stage}s)"
        on_palette = "" if measured.palette is None else f", {measured.palette:.0%} of colour on its palette"
        line = (
            f"  consistency {measured.style}{stage}: {measured.score:.2f} over {measured.images} images"
            f"{on_palette}{strays}"
        )
        out.print(line, markup=False)
    for failure in view.failures:
        out.print(
            f"  failed {failure['plan']}/{failure['style']} seeds {failure['seeds']}: {failure['error']}", markup=False
        )


def _summary(view: JobView) -> str:
    """`running (12/48 tasks rendered: ...; ETA 164 s)`: rendered counts what was written, not what ended, and
    an ETA is given only while some live worker can take the job's tasks."""
    counts = ", ".join(f"{k} {v}" for k, v in view.counts.items() if v)
    if view.training is not None:
        return f"{view.status.value} ({_training_line(view.training)})"
    line = f"{view.status.value} ({view.rendered}/{view.total} tasks rendered: {counts}"
    if view.status.ended:
        return line + ")"
    if view.status is JobStatus.WAITING_FOR_PICK:
        return line + f"); pick drafts to finish with `archfarm pick {view.id} ID...`, or end it with `--done`"
    if view.workers == 0:
        return line + "); no live worker can take its tasks: start `archfarm worker` on its queue"
    left = "" if view.work_left_s is None else f"; ≈ {view.work_left_s:.0f} GPU-s of work left"
    return line + ("" if view.eta_s is None else f"; ETA {view.eta_s:.0f} s") + left + _deadline_line(view) + ")"


def _deadline_line(view: JobView) -> str:
    """`; deadline 07:00 (Mon 08 Dec), expected 05:12: on time`, in this machine's zone; `AT RISK` when the farm
    expects to miss it."""
    if view.deadline_at is None:
        return ""

    def when(at: datetime) -> str:
        return at.astimezone().strftime("%H:%M %Z (%a %d %b)")

    line = f"; deadline {when(view.deadline_at)}"
    if view.expected_at is not None:
        line += f", expected {when(view.expected_at)}"
    return line + (": AT RISK" if view.at_risk else ": on time" if view.expected_at is not None else "")


def _training_line(training: TrainingProgress) -> str:
    """`training step 120/1000, loss 0.0831, 31.2 samples/s → file:///…/controlnet`."""
    if training.step is None:
        return f"training not started → {training.model_url}"
    return (
        f"training step {training.step}/{training.max_steps}, loss {training.loss:.4f}, "
        f"{training.samples_per_s:.1f} samples/s, {training.skipped_rows} bad rows skipped → {training.model_url}"
    )


@app.command()
def profiles() -> None:
    """The built-in profiles, with their model stacks and settings."""
    for name in BUILTIN:
        profile = load_profile(name)
        units = ", ".join(
            f"{unit.kind} {unit.scale:g} [{unit.start:g}-{unit.end:g}]" + (f" ({unit.model})" if unit.model else "")
            for unit in profile.controls
        )
        vae = f", vae {profile.vae}" if profile.vae else ""
        vae += f", union {profile.union}" if profile.union else ""
        vae += ", T2I-Adapters" if profile.adapters else ""
        licences = sorted({licence.name for _, ref in every_model(profile) if (licence := licence_of(ref))})
        out.print(
            f"{name}\n  base {profile.base} ({known_family(profile.base)}){vae}; controls: {units}\n  "
            f"{profile.width}×{profile.height}, "
            f"{profile.steps} steps, guidance {profile.guidance_scale:g}, scheduler {profile.scheduler}\n"
            f"  licences: {', '.join(licences) or 'unknown'}",
            markup=False,
        )


@app.command()
def cancel(
    job_id: JobId,
) -> None:
    """Queued tasks never start; running ones stop at their next step."""
    with _farm() as farm:
        job_id = farm.resolve(job_id)
        cancelled = farm.cancel(job_id)
        view = farm.status(job_id)
    if cancelled is None:
        out.print(f"{job_id}: already {view.status.value}; nothing to cancel", markup=False)
    else:
        out.print(f"{job_id}: cancelled {cancelled} queued task(s); running ones stop at their next step", markup=False)


@app.command()
def retry(
    job_id: JobId,
) -> None:
    """Requeue failed and cancelled tasks (and re-send queued ones)."""
    with _farm() as farm:
        job_id = farm.resolve(job_id)
        sent = farm.retry(job_id)
    out.print(f"{job_id}: {sent} task(s) queued again", markup=False)


@app.command()
def pick(
    job_id: JobId,
    artifacts: Annotated[
        list[int] | None, typer.Argument(metavar="ARTIFACT", help="Ids of drafts to finish (`archfarm results`).")
    ] = None,
    done: Annotated[bool, typer.Option("--done", help="Close the picks: the job ends with its finals.")] = False,
) -> None:
    """Pick drafts of a staged job: each is rendered again at full quality (on the farm, or here without a
    broker). Pick any number of times while the job waits; `--done` closes the gate."""
    if not artifacts and not done:
        _fail("name the drafts to pick (ARTIFACT ids from `archfarm results`), or --done")
    with _farm() as farm:
        job_id = farm.resolve(job_id)
        finals = farm.pick(job_id, artifacts or [], done=done)
        view = farm.status(job_id)
    out.print(f"{job_id}: {len(finals)} final(s) added; {view.status.value}", markup=False)


@app.command()
def revise(
    artifact: Annotated[int, typer.Argument(metavar="ARTIFACT", help="The approved image's id (`archfarm results`).")],
    mask: Annotated[str, typer.Option("--mask", help="An image, white where to re-render: path or URL.")],
    prompt: Annotated[str | None, typer.Option("--prompt", help="A new prompt (default: the image's own).")] = None,
    seeds: Annotated[int, typer.Option("--seeds", metavar="N", help="Variants, from the image's seed on.")] = 1,
    feather: Annotated[int, typer.Option("--feather", help="Pixels over which the change blends in.")] = 8,
) -> None:
    """Re-render only the masked region of an image, as a child job: every pixel beyond the mask's feathered
    band stays the parent's, bit for bit. On the farm, or here without a broker."""
    with _farm() as farm:
        job_id = farm.submit(farm.revision(artifact, mask, prompt=prompt, seeds=seeds, feather=feather))
        view = farm.status(job_id)
    out.print(f"revision job {job_id} of image {artifact}: {view.status.value} → {view.output_url}", markup=False)


@app.command()
def upscale(
    artifact: Annotated[int, typer.Argument(metavar="ARTIFACT", help="The image's id (`archfarm results`).")],
    long_side: Annotated[
        int | None, typer.Option("--long-side", metavar="PX", help="The result's longer side.")
    ] = None,
    scale: Annotated[float | None, typer.Option("--scale", help="The result's size over the image's.")] = None,
    tile: Annotated[int | None, typer.Option("--tile", metavar="PX", help="Tile side (default per family).")] = None,
    overlap: Annotated[int | None, typer.Option("--overlap", metavar="PX", help="Least tile overlap.")] = None,
    strength: Annotated[float, typer.Option("--strength", help="How much of each tile is rendered again.")] = 0.35,
    format: Annotated[str, typer.Option("--format", help="png, tiff16 or jpeg.")] = "png",
    plan_units: Annotated[bool, typer.Option(help="Steer tiles with the profile's plan maps too.")] = True,
) -> None:
    """Enlarge an image to delivery size as a child job: its tiles render on every worker of the pool, then one
    task blends them into the image. On the farm, or here without a broker."""
    with _farm() as farm:
        spec = farm.upscaling(
            artifact,
            long_side=long_side,
            scale=scale,
            tile=tile,
            overlap=overlap,
            strength=strength,
            format=format,
            plan_units=plan_units,
        )
        job_id = farm.submit(spec)
        view = farm.status(job_id)
    out.print(f"upscale job {job_id} of image {artifact}: {view.status.value} → {view.output_url}", markup=False)


@app.command()
def pause(
    job_id: JobId,
) -> None:
    """Hold a job back: its running tasks finish, its queued ones wait until `resume`."""
    with _farm() as farm:
        job_id = farm.resolve(job_id)
        done = farm.pause(job_id)
    out.print(f"{job_id}: paused" if done else f"{job_id}: already paused", markup=False)


@app.command()
def resume(
    job_id: JobId,
) -> None:
    """Let a paused job's queued tasks run again."""
    with _farm() as farm:
        job_id = farm.resolve(job_id)
        sent = farm.resume(job_id)
    out.print(f"{job_id}: resumed, {sent} task(s) sent", markup=False)


@app.command()
def priority(
    job_id: JobId,
    value: Annotated[int, typer.Argument(metavar="N", help="0-100, higher first.")],
) -> None:
    """Change a job's priority; its queued tasks take their turn at it."""
    with _farm() as farm:
        job_id = farm.resolve(job_id)
        sent = farm.set_priority(job_id, value)
    out.print(f"{job_id}: priority {value}, {sent} queued task(s) sent at it now", markup=False)


@app.command()
def workers(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Every worker: device, pools, state (live, stale, dead, stopped), current task, images, loads, swaps, and
    when it was ready to take tasks (after warming its `--warm` profiles)."""
    _json_errors.set(as_json)
    with _farm() as farm:
        views = farm.workers()
    if as_json:
        _print_json([view.model_dump(mode="json") for view in views])
        return
    for view in views:
        ready = "warming" if view.ready_s is None else f"ready after {view.ready_s:.0f} s"
        warmed = ", ".join(f"{w['profile']} {w.get('buckets', 'failed')}" for w in view.warmed)
        out.print(
            f"{view.id}  {view.state:<7} {view.device:<6} "
            f"{'' if view.memory_gib is None else f'{view.memory_gib:.1f} GiB  '}"
            f"heartbeat {view.heartbeat_age_s:.0f} s ago  "
            f"images {view.images_done}  loads {view.model_loads}  swaps {view.stack_swaps}  "
            f"task {view.current_task or '-'}  {ready}{f' (warmed {warmed})' if warmed else ''}",
            markup=False,
        )


@app.command()
def results(
    job_id: JobId,
    download: Annotated[Path | None, typer.Option("--download", help="Copy images and sidecars here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    tiles: Annotated[bool, typer.Option("--tiles", help="List an upscale's tiles too.")] = False,
) -> None:
    """List a job's images (id, pass, plan/style, seed, size, adherence or an upscale's seam score, URL; a
    picked draft is `draft*`; a re-roll chain's others are `superseded by` its kept image), or download them
    (the kept ones)."""
    _json_errors.set(as_json)
    with _farm() as farm:
        job_id = farm.resolve(job_id)
        artifacts = farm.results(job_id, tiles=tiles)
        written = farm.download(job_id, download) if download is not None else []
    if as_json:
        _print_json(
            {
                "job": job_id,
                "artifacts": [a.model_dump(mode="json") for a in artifacts],
                "downloaded": [str(p) for p in written],
            }
        )
        return
    for artifact in artifacts:
        staged = "" if artifact.stage == "render" else f"{artifact.stage}{'*' if artifact.picked else ''}\t"
        score = (
            f"seam {artifact.seam:.3f}"
            if artifact.seam is not None
            else f"adherence {'-' if artifact.adherence is None else f'{artifact.adherence:.3f}'}"
        )
        size = f"{artifact.width}x{artifact.height}"
        kept = "" if artifact.superseded_by is None else f"\tsuperseded by {artifact.superseded_by}"
        out.print(
            f"{artifact.id}\t{staged}{artifact.plan}/{artifact.style}\tseed {artifact.seed}\t{size}\t"
            f"{score}\t{artifact.url}{kept}",
            markup=False,
        )
    if download is not None:
        out.print(f"downloaded {len(written)} file(s) to {download}", markup=False)


@app.command()
def sheet(
    job_id: JobId,
    out_file: Annotated[
        Path, typer.Option("--out", help="FILE.png (to mail or post) or FILE.html (images embedded, opens offline).")
    ],
    cell: Annotated[
        int, typer.Option("--cell", min=32, max=256, metavar="PX", help="A PNG's cell size in pixels (default 256).")
    ] = 256,
) -> None:
    """Write a job's contact sheet: a row per plan × style, a column per seed, each image labelled."""
    from producer.sheet import write_sheet

    with _farm() as farm:
        grid = farm.sheet(farm.resolve(job_id))
        images = write_sheet(grid, lambda artifact: farm.read(artifact, "thumbnail"), out_file, cell)
    cells = len(grid.rows) * len(grid.seeds)
    missing = f" ({cells - images} without an image)" if images < cells else ""
    out.print(
        f"{out_file}: {len(grid.rows)} plan × style rows × {len(grid.seeds)} seeds, {images} images{missing}",
        markup=False,
    )


@app.command()
def worker(
    devices: Annotated[str, typer.Option("--devices", help="auto, cuda:0,1, cpu or cpu:N")] = "auto",
    pool: Annotated[
        list[str] | None,
        typer.Option(
            "--pool",
            metavar="NAME",
            help="Render the jobs of this pool (a job's `pool:`); repeatable; `default` is the jobs without one "
            "(the default when no --pool is given).",
        ),
    ] = None,
    warm: Annotated[
        list[str] | None,
        typer.Option(
            "--warm",
            metavar="PROFILE",
            help="Compile every batch bucket of this profile (built-in name or YAML) before taking tasks; repeatable.",
        ),
    ] = None,
) -> None:
    """Run one Celery worker process per device until stopped (SIGTERM: finish the current task first).

    Refuses to start, in one line, without a broker, against a database schema other than this archfarm's,
    or with a device this machine does not have."""
    from producer.database import open_database
    from workers.launcher import launch, parse_devices

    settings = Settings()
    if not settings.broker_url:
        _fail("no broker configured: set ARCHFARM_BROKER_URL (e.g. redis://host:6379/0)")
    chosen = parse_devices(devices)
    for name in pool or []:
        if not re.fullmatch(NAME_PATTERN, name):
            _fail(f"--pool {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    names = [settings.queue_for(name) for name in pool or [DEFAULT_POOL]]
    for profile in warm or []:
        load_profile(profile)  # a profile that does not load is refused here, not in every pool process
    if warm:
        os.environ["ARCHFARM_WARM"] = json.dumps(warm)  # the worker processes' settings
    engine, _ = open_database(settings)
    engine.dispose()
    raise typer.Exit(launch(chosen, names, settings))


@app.command()
def kube(
    pool: Annotated[
        list[str] | None,
        typer.Option(
            "--pool",
            metavar="NAME[=PROFILE]",
            help="A pool of GPU workers and its heaviest profile (built-in name or YAML), which sizes its pods' "
            "grace period; repeatable (default: the default pool, sd15-archviz).",
        ),
    ] = None,
    min_workers: Annotated[int, typer.Option("--min-workers", min=0, help="Warm workers per pool (0: to zero).")] = 0,
    max_workers: Annotated[int, typer.Option("--max-workers", min=1, help="Most workers per pool.")] = 8,
    target: Annotated[int, typer.Option("--target", min=1, help="GPU-seconds of a pool's backlog per worker.")] = 1800,
    image: Annotated[str, typer.Option("--image", help="The producer image (API).")] = "archfarm/producer:latest",
    worker_image: Annotated[str, typer.Option("--worker-image")] = "archfarm/worker:latest",
    flower: Annotated[bool, typer.Option("--flower", help="Add Celery's Flower.")] = False,
) -> None:
    """Print Kubernetes manifests for this farm: the API, a worker Deployment per pool scaled by KEDA on its
    backlog in GPU-seconds, and Prometheus (`kubectl apply -f -`; the `archfarm` Secret is yours to create)."""
    from producer.kube import Pool, dump, manifests, parse_pool

    pools = []
    for text in pool or [DEFAULT_POOL]:
        name, profile = parse_pool(text, "sd15-archviz")
        try:
            pools.append(Pool(name, load_profile(profile), min_workers, max_workers, target))
        except ValueError as error:
            _fail(str(error))
    out.print(dump(manifests(pools, Settings(), image, worker_image, flower)), markup=False, end="")


@app.command()
def warmup(
    profile: Annotated[str, typer.Argument(help="Built-in profile name or a YAML file.")],
    batch: Annotated[
        list[int] | None,
        typer.Option(
            "--batch",
            min=1,
            metavar="N",
            help="Images per call to compile for; repeatable (default: what a worker here would choose).",
        ),
    ] = None,
) -> None:
    """Compile a profile on this machine's device (ARCHFARM_DEVICE) and keep the compiled code in the farm's
    storage (ARCHFARM_STORAGE_URL): workers with the same torch version and GPU model then start warm."""
    from workers.warmup import warmup as warm

    device, warmed = warm(load_profile(profile), batch, Settings())
    if not warmed:
        _warn(f"profile {profile} does not compile on {device} (`compile: auto` compiles on CUDA only); nothing to do")
    for each in warmed:
        how = {"cold": "compiled and stored", "warm": "loaded from the farm's cache", "compiled": "done above"}
        out.print(f"{device} batch {each.images}: {each.state}, {how[each.state]}, {each.seconds:.1f} s", markup=False)


@app.command()
def api(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
) -> None:
    """Serve the REST API (submit, status, cancel, retry, results) and the dashboard at /."""
    import uvicorn

    from producer.api import create_app
    from producer.database import open_database

    settings = Settings()
    engine, _ = open_database(settings)  # the schema checked here, in one line, before the server starts
    engine.dispose()
    application = create_app(settings, listen_host=host)
    uvicorn.run(application, host=host, port=port)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="Who holds it: a person, a pipeline, a studio.")],
    admin: Annotated[bool, typer.Option("--admin", help="May also change other owners' jobs.")] = False,
) -> None:
    """Create a token and print it, once: only its SHA-256 is stored."""
    from shared.db.tokens import create_token

    if not re.fullmatch(NAME_PATTERN, name):
        _fail(f"token name {name[:64]!r}: use letters, digits, '.', '_' and '-' (at most 64)")
    with _farm() as farm, farm.sessions.begin() as session:
        token = create_token(session, name, admin)
    out.print(token, markup=False)


@token_app.command("list")
def token_list() -> None:
    """Every token's name, role, creation and revocation time (never the token)."""
    from shared.db.tokens import tokens

    with _farm() as farm, farm.sessions() as session:
        rows = tokens(session)
    for name, is_admin, created, revoked in rows:
        state = f"revoked {revoked:%Y-%m-%d %H:%M}" if revoked else "active"
        role = "admin" if is_admin else "user"
        out.print(f"{name}  {role}  created {created:%Y-%m-%d %H:%M}  {state}", markup=False)


@token_app.command("revoke")
def token_revoke(name: Annotated[str, typer.Argument(help="The token's name.")]) -> None:
    """Revoke a token: requests bearing it are refused from now on."""
    from shared.db.tokens import revoke_token

    with _farm() as farm, farm.sessions.begin() as session:
        revoke_token(session, name)
    out.print(f"{name}: revoked", markup=False)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply the schema migrations to ARCHFARM_DATABASE_URL."""
    from shared.db.session import make_engine, upgrade

    engine = make_engine(Settings().database_url)
    upgrade(engine, revision)
    out.print(f"database at {revision}: {engine.url.render_as_string(hide_password=True)}", markup=False)


app.command("train")(train_command)
app.add_typer(dataset_app, name="dataset")
app.add_typer(styles_app, name="styles")


def main() -> None:
    app(prog_name="archfarm")


if __name__ == "__main__":
    main()
