"""Delivery resolution: one image enlarged to a 4K long side, its tiles rendered on 1, 2 and 3 workers.

    python bench/upscale.py [--quick] [--json] [--long-side 4096] [--workers 1,2,3] [--threads 1] [--crop PATH]

A 128×64 render of the example plan (tiny models) is enlarged to LONG_SIDE on its long side in 512² tiles
overlapping by 64 (the SD 1.5 defaults), strength 0.35, on `archfarm worker --devices cpu:N` for each N of
`--workers` (after a warm-up upscale, so models are resident; `--quick` skips it), against one scratch
PostgreSQL database and Redis. Printed: the wall time from submit to the assembled image per worker count and
the speed-up over one worker; the seam score of the assembled image against that of the same tiles pasted
without blending; and the peak memory growth and time of the assembly alone, re-run on the stored tiles in a
process of its own.
`--crop PATH` writes a 256² crop around a tile corner, pasted (left) and blended (right), for the README.

Each worker renders on `--threads` CPU threads (default 1), as each GPU worker has a device of its own: a
CPU worker otherwise takes its share of the cores, and one worker alone already takes them all. The speed-up
is then bounded by the machine's cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cpu_workers, farm_environment, report, scratch_database  # noqa: E402
from producer.local import Embedded  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.spec import JobSpec  # noqa: E402
from shared.tiles import Grid, tile_key  # noqa: E402
from workers.assembly import seam_score  # noqa: E402

PLAN = ROOT / "examples" / "floorplan.png"
PROFILE = {"base": "tiny-sd15", "width": 128, "height": 64, "steps": 8, "controls": [{"kind": "canny"}]}


def job(output: Path, upscale: dict[str, Any] | None = None) -> JobSpec:
    """The source render (no `upscale`), or its upscale."""
    document = {"plans": [str(PLAN)], "styles": ["modern"], "seeds": [1], "profile": PROFILE, "output": str(output)}
    return JobSpec.model_validate({**document, "upscale": upscale} if upscale else document)


def enlarge(image: Path, long_side: int, tile: int, overlap: int) -> dict[str, Any]:
    return {"image": str(image), "long_side": long_side, "tile": tile, "overlap": overlap, "strength": 0.35}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-side", type=int, default=4096)
    parser.add_argument("--workers", default="1,2,3", help="worker counts to run, comma-separated")
    parser.add_argument("--quick", action="store_true", help="a 512 long side in 128² tiles, on 1 worker, no warm-up")
    parser.add_argument("--crop", type=Path, help="write a pasted | blended crop around a tile corner here")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    args.tile, args.overlap = (128, 32) if args.quick else (512, 64)
    if args.quick:
        args.long_side, args.workers = 512, "1"
    with scratch_database("archfarm_bench_upscale") as database_url:
        results = measure(args, database_url)
    report(results, args.json)


def measure(args: argparse.Namespace, database_url: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="archfarm-bench-"))
    models_dir = Path(os.environ.get("ARCHFARM_MODELS_DIR") or work / "models")
    farm_environment(database_url, work, models_dir, "bench-upscale")
    results: dict[str, Any] = {}
    try:
        embedded = Embedded(Settings(broker_url=None))
        embedded.render(job(work / "source"))
        embedded.close()
        source = next((work / "source").rglob("*.png"))
        last: Path | None = None
        for count in [int(n) for n in args.workers.split(",")]:
            with cpu_workers(count, work) as farm:
                if not args.quick:  # a smoke run times the models' loading too
                    warm = farm.submit(job(work / f"warm-{count}", enlarge(source, 256, 128, 16)))
                    if farm.wait(warm, timeout=600).status.value != "succeeded":
                        raise SystemExit(f"the warm-up upscale failed: {farm.status(warm).failures[:1]}")
                started = time.perf_counter()
                job_id = farm.submit(
                    job(work / f"up-{count}", enlarge(source, args.long_side, args.tile, args.overlap))
                )
                view = farm.wait(job_id, timeout=3600, poll=0.1)
                wall = time.perf_counter() - started
                if view.status.value != "succeeded":
                    raise SystemExit(f"the upscale on {count} worker(s) ended {view.status.value}: {view.failures[:1]}")
                (image,) = farm.results(job_id)
            results["size"] = f"{image.width}x{image.height}"
            results[f"wall_s_{count}_workers"] = wall
            results[f"speedup_{count}_workers"] = results[f"wall_s_{args.workers.split(',')[0]}_workers"] / wall
            results["seam_blended"] = image.seam
            last = Path(image.url.removeprefix("file://"))
        assert last is not None  # at least one worker count ran
        grid = Grid(image.width, image.height, args.tile, args.overlap)
        results["tiles"] = grid.count
        pasted = paste(grid, last)
        results["seam_pasted"] = seam_score(pasted, grid)
        results.update(assembly_alone(grid, last))
        if args.crop is not None:
            write_crop(grid, pasted, cv2.imread(str(last)), args.crop)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def tile_paths(image: Path, count: int) -> list[Path]:
    """Where the stored tiles of the assembled `image` lie (beside it, as `shared.tiles.tile_key` puts them)."""
    return [Path(tile_key(str(image), index)) for index in range(count)]


def paste(grid: Grid, image: Path) -> np.ndarray:
    """The stored tiles laid over one another in order, unblended: what the blend is there to avoid."""
    out = np.zeros((grid.height, grid.width, 3), np.uint8)
    for index, path in enumerate(tile_paths(image, grid.count)):
        left, top, right, bottom = grid.box(index)
        out[top:bottom, left:right] = cv2.imread(str(path))
    return out


def assembly_alone(grid: Grid, image: Path) -> dict[str, float]:
    """The assembly of the stored tiles in a process of its own: its peak memory growth and its time."""
    code = textwrap.dedent(
        f"""
        import sys, time
        import cv2
        sys.path.insert(0, {str(ROOT)!r})
        from bench.memory import reset_peak, rss
        from shared.tiles import Grid
        from workers.assembly import assemble
        grid = Grid({grid.width}, {grid.height}, {grid.tile}, {grid.overlap})
        paths = {[str(p) for p in tile_paths(image, grid.count)]!r}
        reset_peak()
        before = rss("VmRSS")
        started = time.perf_counter()
        assemble(grid, lambda index: cv2.imread(paths[index]), "png")
        print((rss("VmHWM") - before) / 1024, time.perf_counter() - started)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    grown_mib, seconds = map(float, done.stdout.split())
    return {
        "assembly_peak_growth_mib": grown_mib,
        "assembly_output_mib": grid.width * grid.height * 3 / 2**20,
        "assembly_s": seconds,
    }


def write_crop(grid: Grid, pasted: np.ndarray, blended: np.ndarray, path: Path) -> None:
    """256² around the first inner tile corner, pasted | blended, side by side."""
    columns, rows = grid.edges()
    x, y = max(0, columns[0] - 128), max(0, rows[0] - 128)
    crop = [image[y : y + 256, x : x + 256] for image in (pasted, blended)]
    cv2.imwrite(str(path), np.concatenate([crop[0], np.full((256, 4, 3), 255, np.uint8), crop[1]], axis=1))


if __name__ == "__main__":
    main()
