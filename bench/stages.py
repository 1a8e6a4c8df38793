"""What a delivered final costs when drafts are cheap: a staged job against rendering everything at full quality.

    python bench/stages.py [--quick] [--json] [--size 256] [--steps 30] [--seeds 16] [--reps N]

Both ways deliver the same two images per plan and style, picked from `--seeds` compositions:
(a) full: every seed rendered at SIZE² with STEPS steps, a person then picks two;
(b) staged: every seed drafted at a quarter of the pixels with 12 steps, the two best kept (`pick: by:
    adherence`, so no one waits), and each re-rendered at SIZE² image-to-image at strength 0.5 (about
    STEPS × 0.5 steps).
Each runs in-process (`Embedded`, as `archfarm render`) on the same resident models, alternately, `--reps`
times; the ratio of the medians is printed beside what the pixel-steps formula predicts:

    staged / full = (seeds × ¼ × draft_steps + picks × ⌊strength × steps⌋) / (seeds × steps)

On a GPU with real models the per-step cost is closer to proportional to the pixels than on a CPU with tiny
ones, whose fixed costs per call (text encoding, VAE, Python) weigh more at small sizes.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from producer.local import Embedded  # noqa: E402
from shared.config import Settings  # noqa: E402
from shared.spec import JobSpec  # noqa: E402

PLAN = ROOT / "examples" / "floorplan.png"
DRAFT_STEPS, PICKS, STRENGTH = 12, 2, 0.5


def spec(args: argparse.Namespace, staged: bool, output: Path) -> JobSpec:
    job: dict[str, Any] = {
        "name": "staged" if staged else "full",
        "plans": [str(PLAN)],
        "styles": ["modern"],
        "seeds": {"count": args.seeds},
        "profile": {
            "base": "tiny-sd15",
            "width": args.size,
            "height": args.size,
            "steps": args.steps,
            "controls": [{"kind": "canny", "model": "tiny-canny"}],
        },
        "output": str(output),
    }
    if staged:
        half = args.size // 2
        job["draft"] = {"width": half, "height": half, "steps": DRAFT_STEPS}
        job["pick"] = {"by": "adherence", "count": PICKS}
        job["final"] = {"scale": 2, "strength": STRENGTH}
    return JobSpec.model_validate(job)


def predicted(args: argparse.Namespace) -> float:
    staged = args.seeds * 0.25 * DRAFT_STEPS + PICKS * int(STRENGTH * args.steps)
    return staged / (args.seeds * args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller and fewer runs (about a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    if args.quick:
        args.size, args.steps = min(args.size, 128), min(args.steps, 20)
    reps = args.reps or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="archfarm-stages-"))
    settings = Settings(
        database_url=f"sqlite:///{work / 'state.db'}",
        models_dir=Path(os.environ.get("ARCHFARM_MODELS_DIR") or work / "models"),
        broker_url=None,
        notify_urls=[],
    )
    seconds: dict[str, list[float]] = {"full": [], "staged": []}
    farm = Embedded(settings)
    try:
        farm.render(spec(args, False, work / "warm"))  # models loaded before anything is timed
        for rep in range(reps):
            for name in ("full", "staged"):
                started = time.perf_counter()
                report = farm.render(spec(args, name == "staged", work / f"{name}-{rep}"))
                seconds[name].append(time.perf_counter() - started)
                if not report.ok:
                    raise SystemExit(f"{name}: {report.errors}")
    finally:
        farm.close()
        shutil.rmtree(work, ignore_errors=True)
    full, staged = median(seconds["full"]), median(seconds["staged"])
    results = {
        "size": args.size,
        "steps": args.steps,
        "seeds": args.seeds,
        "picks": PICKS,
        "full_s": round(full, 3),
        "staged_s": round(staged, 3),
        "full_s_per_delivered": round(full / PICKS, 3),
        "staged_s_per_delivered": round(staged / PICKS, 3),
        "ratio_measured": round(staged / full, 3),
        "ratio_formula": round(predicted(args), 3),
    }
    print(
        f"{args.seeds} seeds at {args.size}², {args.steps} steps; {PICKS} delivered:\n"
        f"  full    {full:7.2f} s  ({full / PICKS:.2f} s per delivered image)\n"
        f"  staged  {staged:7.2f} s  ({staged / PICKS:.2f} s per delivered image)\n"
        f"  staged / full: {staged / full:.3f} measured, {predicted(args):.3f} by the pixel-steps formula",
        flush=True,
    )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
