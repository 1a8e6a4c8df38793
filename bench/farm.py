"""Farm benchmark: in-process vs distributed wall time, per-task overhead, model loads and swaps per worker.

    python bench/farm.py [--tasks 40 | --quick] [--json]

Needs PostgreSQL and Redis on 127.0.0.1 (override with ARCHFARM_BENCH_POSTGRES_URL / ARCHFARM_BENCH_REDIS_URL);
results go to a temporary folder; tiny models are built into ARCHFARM_MODELS_DIR (or a temporary folder).
Creates a throwaway database and queue and removes them afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

from sqlalchemy import select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cpu_workers, farm_environment, scratch_database  # noqa: E402
from producer.client import Farm  # noqa: E402
from producer.local import Embedded  # noqa: E402
from shared.broker import Message, make_celery, send_tasks  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.db.models import Task, Worker  # noqa: E402
from shared.limits import task_time_limit  # noqa: E402
from shared.spec import JobSpec  # noqa: E402
from workers.engine.presets import resolve  # noqa: E402

PLAN = ROOT / "examples" / "floorplan.png"
PROFILE = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 4, "controls": [{"kind": "canny"}]}


def job(seeds: int, output: Path, controlnet: str | None = None) -> JobSpec:
    profile = dict(PROFILE)
    if controlnet:
        profile["controls"] = [{"kind": "canny", "model": controlnet}]
    return JobSpec.model_validate(
        {
            "name": "bench",
            "plans": [str(PLAN)],
            "styles": ["modern", "japandi"],
            "seeds": {"count": seeds},
            "profile": profile,
            "output": str(output),
        }
    )


def compute_seconds(output: Path) -> float:
    """Render + preprocess time recorded in the sidecars (per task, counted once per task)."""
    per_task: dict[str, float] = {}
    for sidecar in output.rglob("*.json"):
        meta = json.loads(sidecar.read_text())
        per_task[meta["task"]] = meta["timings"]["render_s"] + meta["timings"]["preprocess_s"]
    return sum(per_task.values())


def wait_done(farm: Farm, job_ids: list[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    for job_id in job_ids:
        view = farm.wait(job_id, timeout=max(1.0, deadline - time.monotonic()), poll=0.05)
        if view.status.value != "succeeded":
            raise SystemExit(f"job {job_id} ended {view.status.value}: {view.failures[:1]}")


def worker_counters(farm: Farm) -> dict[str, tuple[int, int]]:
    with farm.sessions() as session:
        rows = session.execute(
            select(Worker.id, Worker.model_loads, Worker.stack_swaps).where(Worker.stopped_at.is_(None))
        )
        return {worker_id: (loads, swaps) for worker_id, loads, swaps in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=40, help="tasks per job (even)")
    parser.add_argument("--quick", action="store_true", help="8 tasks per job")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = parser.parse_args()
    if args.quick:
        args.tasks = 8

    with scratch_database("archfarm_bench") as database_url:
        results = measure(args, database_url)
    print(f"{'measure':<40} value")
    for key, value in results.items():
        if key != "profile":
            shown = f"{value:.1f}" if isinstance(value, float) else value
            print(f"{key:<40} {shown}")
    if args.json:
        print(json.dumps(results))


def measure(args: argparse.Namespace, database_url: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="archfarm-bench-"))
    models_dir = Path(os.environ.get("ARCHFARM_MODELS_DIR") or work / "models")
    farm_environment(database_url, work, models_dir, "bench")
    # A second ControlNet (another folder, so another model to the cache) for the two-stack measurement.
    other = work / "canny-b"
    shutil.copytree(resolve("tiny-canny", models_dir), other)
    seeds = args.tasks // 2
    results: dict[str, Any] = {"tasks": args.tasks, "profile": PROFILE}
    try:
        # In-process: the embedded path, same database, one warm-up job first so models are resident.
        embedded = Embedded(Settings(broker_url=None))
        embedded.render(job(2, work / "warm"))
        started = time.perf_counter()
        embedded.render(job(seeds, work / "inprocess"))
        wall = time.perf_counter() - started
        embedded.close()
        results["inprocess_wall_s"] = wall
        results["inprocess_overhead_ms"] = (wall - compute_seconds(work / "inprocess")) / args.tasks * 1000
        with cpu_workers(2, work) as farm:
            distributed(farm, args.tasks, seeds, work, other, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def distributed(farm: Farm, tasks: int, seeds: int, work: Path, other: Path, results: dict[str, Any]) -> None:
    """Two workers on this machine: wall time and overhead, then two stacks grouped vs interleaved."""
    wait_done(farm, [farm.submit(job(4, work / "warm2"))])
    started = time.perf_counter()
    job_id = farm.submit(job(seeds, work / "distributed"))
    wait_done(farm, [job_id])
    wall = time.perf_counter() - started
    results["distributed_2_wall_s"] = wall
    results["distributed_2_overhead_ms"] = (2 * wall - compute_seconds(work / "distributed")) / tasks * 1000
    with farm.sessions() as session:
        rows = session.execute(select(Task.started_at, Task.finished_at).where(Task.job_id == job_id)).all()
    results["distributed_task_db_span_ms_median"] = median((f - s).total_seconds() * 1000 for s, f in rows if s and f)

    celery = make_celery(farm.settings)
    for order in ("grouped", "interleaved"):
        before = worker_counters(farm)
        specs = [job(seeds, work / f"{order}-{name}", net) for name, net in (("a", None), ("b", str(other)))]
        limit = task_time_limit(specs[0].profile, farm.settings)
        ids = [submit_without_sending(farm, spec) for spec in specs]
        messages = [[Message(t, job_id, farm.settings.queue, 50, limit) for t in task_ids] for job_id, task_ids in ids]
        if order == "grouped":
            sequence = messages[0] + messages[1]
        else:
            sequence = [m for pair in zip(messages[0], messages[1], strict=True) for m in pair]
        send_tasks(celery, sequence)  # the bench replays both arrival orders
        wait_done(farm, [job_id for job_id, _ in ids])
        after = worker_counters(farm)
        results[f"{order}_loads_per_worker"] = {w: after[w][0] - before[w][0] for w in after}
        results[f"{order}_swaps_per_worker"] = {w: after[w][1] - before[w][1] for w in after}


def submit_without_sending(farm: Farm, spec: JobSpec) -> tuple[str, list[str]]:
    from producer.submit import persist, prepare

    prepared = prepare(spec, farm.settings)
    with farm.sessions.begin() as session:
        persist(session, prepared)
    return prepared.id, [t.id for t in prepared.tasks]


if __name__ == "__main__":
    main()
