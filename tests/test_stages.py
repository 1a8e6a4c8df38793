"""Staged jobs: drafts, a pick gate and finals that keep their draft's composition; geometry adherence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from producer.client import Farm
from shared.config import Settings
from shared.db.status import JobStatus
from shared.errors import InvalidInput
from shared.spec import JobSpec
from tests.models_fixture import PLAN_A, PLAN_B, tiny_render

PROFILE = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 4, "controls": [{"kind": "canny"}]}
STAGES = {
    "draft": {"steps": 2},
    "pick": {"by": "hand"},
    "final": {"scale": 2, "strength": 0.5},
}


def test_stages_come_together_and_a_final_fits_the_size_limit() -> None:
    job = {"plans": ["a.png"], "styles": ["modern"], "seeds": [1], "profile": PROFILE}
    with pytest.raises(InvalidInput, match="draft, pick and final together"):
        JobSpec.from_document({**job, "draft": {"width": 64}})
    with pytest.raises(InvalidInput, match="over 2048"):
        JobSpec.from_document({**job, **STAGES, "draft": {"width": 1024, "height": 1024}, "final": {"scale": 4}})
    spec = JobSpec.from_document({**job, **STAGES, "draft": {"width": 96, "height": 64, "steps": 2}})
    draft, final = spec.stage_profile("draft"), spec.stage_profile("final")
    assert (draft.width, draft.height, draft.steps) == (96, 64, 2)
    assert (final.width, final.height, final.steps) == (192, 128, 4)  # the profile's steps: full quality


@pytest.mark.slow
def test_a_final_keeps_its_drafts_composition(models_dir: Path) -> None:
    """A final (its draft enlarged and rendered again image-to-image on maps at the final size) keeps the draft's
    layout: compared at 16×16 (composition, not detail), it stays closer to the enlarged draft than a fresh
    render at the final size with the same seed does, and closer the lower its strength. (Strength 0.3: the
    tiny UNet knows only the demo's plans, so each denoising step scrambles more than a real one would; and as
    it draws every building alike, a fresh render is already near: measured 0.84 of its distance.)"""
    import torch

    from workers.engine.models import ModelCache
    from workers.engine.pipeline import ControlInput, Item, Request, Unit, render_batch

    cache = ModelCache(models_dir, torch.device("cpu"), torch.float32)
    common = dict(base="tiny-sd15", net="tiny-canny", seeds=[7], steps=8, guidance_scale=1.0)
    (draft,) = tiny_render(cache, **common).images
    enlarged = draft.resize((128, 128), Image.Resampling.LANCZOS)
    big_map = PLAN_A.resize((128, 128), Image.Resampling.NEAREST)
    controls = [ControlInput("tiny-canny", big_map, 1.0, 0.0, 1.0)]
    (fresh,) = tiny_render(cache, **common, controls=controls, width=128, height=128).images

    def final(strength: float) -> Image.Image:
        item = Item("a bright living room, oak floor", "blurry", 7, (big_map,), enlarged)
        request = Request(
            base="tiny-sd15",
            units=[Unit("tiny-canny", 1.0, 0.0, 1.0)],
            items=[item],
            steps=8,
            guidance_scale=1.0,
            width=128,
            height=128,
            strength=strength,
        )
        (image,) = render_batch(cache, request).images
        assert image.size == (128, 128)
        return image

    def layout_distance(image: Image.Image) -> float:
        small = [np.asarray(i.resize((16, 16), Image.Resampling.BOX), np.float32) for i in (image, enlarged)]
        return float(np.abs(small[0] - small[1]).mean())

    kept, looser = layout_distance(final(0.3)), layout_distance(final(0.7))
    assert kept < 0.9 * layout_distance(fresh)
    assert kept < looser


def test_adherence_scores_edges_against_the_maps() -> None:
    from workers.adherence import adherence

    own = PLAN_A.resize((128, 128), Image.Resampling.NEAREST)
    other = PLAN_B.resize((128, 128), Image.Resampling.NEAREST)
    assert adherence(own, own) == pytest.approx(1.0)
    assert adherence(own, other) < 0.5
    assert adherence(Image.new("RGB", (128, 128), "white"), own) == 0.0


@pytest.mark.slow
def test_picks_render_finals_from_their_drafts_and_done_ends_the_job(
    embedded_settings: Settings, tmp_path: Path, example_plan: Path
) -> None:
    """The embedded path end to end: drafts render, the job waits for a pick, each pick renders a final whose
    sidecar names its draft, and `done` ends the job."""
    job = {"plans": [str(example_plan)], "styles": ["modern"], "seeds": {"count": 4}, "profile": PROFILE, **STAGES}
    with Farm(embedded_settings) as farm:
        job_id = farm.submit(job)
        view = farm.status(job_id)
        assert view.status is JobStatus.WAITING_FOR_PICK
        drafts = farm.results(job_id)
        assert [(a.stage, a.width, a.picked) for a in drafts] == [("draft", 64, False)] * 4
        assert all(a.adherence is not None and 0 <= a.adherence <= 1 for a in drafts)
        chosen = [drafts[0].id, drafts[2].id]
        assert len(farm.pick(job_id, chosen)) == 2
        assert farm.pick(job_id, [drafts[0].id]) == []  # a draft picked twice has one final
        assert farm.status(job_id).status is JobStatus.WAITING_FOR_PICK
        with pytest.raises(InvalidInput, match="no finished draft"):
            farm.pick(job_id, [10_000])
        finals = [a for a in farm.results(job_id) if a.stage == "final"]
        assert sorted(a.parent_id for a in finals) == sorted(chosen)  # type: ignore[type-var]
        assert all((a.width, a.height) == (128, 128) for a in finals)
        for final in finals:
            sidecar = json.loads(Path(final.sidecar_url.removeprefix("file://")).read_text())
            draft = next(a for a in drafts if a.id == final.parent_id)
            assert (sidecar["stage"], sidecar["source"]["artifact"], sidecar["source"]["url"]) == (
                "final",
                draft.id,
                draft.url,
            )
            assert sidecar["seed"] == draft.seed and sidecar["source"]["strength"] == 0.5
        farm.pick(job_id, done=True)
        assert farm.status(job_id).status is JobStatus.SUCCEEDED
        with pytest.raises(InvalidInput, match="picks are closed"):
            farm.pick(job_id, [drafts[1].id])


@pytest.mark.slow
def test_a_rule_picks_the_best_drafts_by_adherence_and_a_waiting_job_cancels(
    embedded_settings: Settings, tmp_path: Path, example_plan: Path
) -> None:
    rule = {**STAGES, "pick": {"by": "adherence", "per": ["plan"], "count": 2}}
    job = {"plans": [str(example_plan)], "styles": ["modern", "japandi"], "seeds": [1, 2], "profile": PROFILE}
    with Farm(embedded_settings) as farm:
        job_id = farm.submit({**job, **rule})
        assert farm.status(job_id).status is JobStatus.SUCCEEDED  # drafts, the rule's pick and finals: one call
        artifacts = farm.results(job_id)
        drafts = sorted((a for a in artifacts if a.stage == "draft"), key=lambda a: -(a.adherence or 0))
        finals = [a for a in artifacts if a.stage == "final"]
        assert {a.parent_id for a in finals} == {a.id for a in drafts[:2]}  # one group (plan): its best two
        assert {a.id for a in drafts if a.picked} == {a.id for a in drafts[:2]}

        waiting = farm.submit({**job, **STAGES})
        assert farm.status(waiting).status is JobStatus.WAITING_FOR_PICK
        assert farm.cancel(waiting) == 0
        assert farm.status(waiting).status is JobStatus.CANCELLED
        with pytest.raises(InvalidInput, match="picks are closed"):
            farm.pick(waiting, [farm.results(waiting)[0].id])


# --- on a farm: real workers, Redis, PostgreSQL, S3 -------------------------------------------------------------

SLOW_FINALS = {
    "profile": {"base": "tiny-sd15", "width": 256, "height": 256, "steps": 16, "controls": [{"kind": "canny"}]},
    "draft": {"width": 64, "height": 64, "steps": 2},
    "pick": {"by": "hand"},
    "final": {"scale": 4, "strength": 0.5},
}


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.s3
@pytest.mark.slow
def test_a_staged_job_on_two_workers_picks_from_the_cli_and_survives_a_kill_during_its_finals(
    farm: Farm, farm_env: dict[str, str], start_workers, example_plan: Path, s3_server, s3_bucket: str
) -> None:
    """8 drafts on two workers; two picks from the CLI; a worker's pool process SIGKILLed while a final renders;
    both finals once each, their sidecars naming their drafts; `--done` ends the job; cancel while waiting."""
    import os
    import signal
    import subprocess
    import sys

    from sqlalchemy import func, select

    from shared.db.models import Artifact, Task
    from tests.processes import children_of, wait_for_value
    from tests.test_farm import pid_of, running_task

    start_workers("cpu:1")
    start_workers("cpu:1")
    job = {"plans": [str(example_plan)], "styles": ["modern", "japandi"], "seeds": {"count": 4}, **SLOW_FINALS}
    job_id = farm.submit(job)
    assert farm.wait(job_id, timeout=180).status is JobStatus.WAITING_FOR_PICK
    drafts = farm.results(job_id)
    assert len(drafts) == 8 and {(a.stage, a.width) for a in drafts} == {("draft", 64)}
    chosen = [drafts[1].id, drafts[6].id]

    def cli(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "producer.cli", *args],
            env={**os.environ, **farm_env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "2 final(s) added" in cli("pick", job_id, *map(str, chosen))
    task = wait_for_value(lambda: running_task(farm, job_id), 60, "a final to start")
    (child,) = children_of(pid_of(farm, task[1]))
    os.kill(child, signal.SIGKILL)
    wait_for_value(lambda: farm.status(job_id).counts["succeeded"] == 10 or None, 300, "both finals, one after a kill")
    assert farm.status(job_id).status is JobStatus.WAITING_FOR_PICK  # still open for more picks
    assert "succeeded" in cli("pick", job_id, "--done")
    assert farm.status(job_id).status is JobStatus.SUCCEEDED
    finals = [a for a in farm.results(job_id) if a.stage == "final"]
    assert sorted(a.parent_id or 0 for a in finals) == sorted(chosen) and {a.width for a in finals} == {256}
    with farm.sessions() as session:  # one row per final, however often it was delivered
        assert session.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id)) == 10
        assert session.scalar(select(Task.attempts).where(Task.id == task[0])) >= 2  # the killed one, again
    for final in finals:
        key = final.sidecar_url.split(f"{s3_bucket}/", 1)[1]
        sidecar = json.loads(s3_server.client().get_object(Bucket=s3_bucket, Key=key)["Body"].read())
        draft = next(a for a in drafts if a.id == final.parent_id)
        assert (sidecar["source"]["artifact"], sidecar["source"]["url"], sidecar["seed"]) == (
            draft.id,
            draft.url,
            draft.seed,
        )
        assert key.split("/", 2)[2].startswith("finals/")

    waiting = farm.submit({**job, "seeds": [9], "styles": ["modern"]})
    assert farm.wait(waiting, timeout=120).status is JobStatus.WAITING_FOR_PICK
    assert "cancelled" in cli("cancel", waiting)
    assert farm.status(waiting).status is JobStatus.CANCELLED


# --- revisions ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_revision_changes_only_its_region_and_rerenders_bitwise(
    embedded_settings: Settings, tmp_path: Path, example_plan: Path
) -> None:
    """A rectangle of an approved image rendered again as a child job: beyond the feathered band every pixel is
    the parent's, bit for bit; inside it changed; its sidecar names the parent and `rerender` gives it again."""
    from producer.rerender import rerender

    settings = embedded_settings
    profile = {**PROFILE, "width": 128, "height": 128}
    with Farm(settings) as farm:
        parent_job = farm.submit({"plans": [str(example_plan)], "styles": ["modern"], "seeds": [3], "profile": profile})
        (parent,) = farm.results(parent_job)
        mask = Image.new("L", (128, 128), 0)
        mask.paste(255, (40, 40, 88, 80))
        spec = farm.revision(parent.id, mask, prompt="a dark living room, walnut floor", seeds=2, feather=6)
        child_job = farm.submit(spec)
        assert farm.status(child_job).status is JobStatus.SUCCEEDED
        revisions = farm.results(child_job)
        old = np.asarray(Image.open(parent.url.removeprefix("file://")))
        band = np.zeros((128, 128), bool)
        band[40 - 7 : 80 + 7, 40 - 7 : 88 + 7] = True  # the rectangle and its 6-pixel band (and a pixel spare)
        for revision in revisions:
            new = np.asarray(Image.open(revision.url.removeprefix("file://")))
            assert np.array_equal(new[~band], old[~band])  # bitwise beyond the band
            assert np.abs(new[40:80, 40:88].astype(int) - old[40:80, 40:88]).mean() > 5  # re-rendered inside
            assert revision.parent_id == parent.id and revision.stage == "render"
        assert [r.seed for r in revisions] == [3, 4]
        sidecar_path = Path(revisions[0].sidecar_url.removeprefix("file://"))
        sidecar = json.loads(sidecar_path.read_text())
        assert sidecar["revision"]["parent"] == parent.id and sidecar["revision"]["image"] == parent.url
        assert sidecar["style"]["prompt"] == "a dark living room, walnut floor"
        assert sidecar["key"].startswith("revisions/")
    again = rerender(sidecar_path, tmp_path / "again", settings)
    assert again.comparison.identical, again.verdict


def test_a_revision_is_refused_before_anything_is_stored_when_its_inputs_are_wrong(
    tmp_path: Path, example_plan: Path
) -> None:
    from producer.submit import prepare

    blank = tmp_path / "blank.png"
    Image.new("L", (64, 64), 0).save(blank)
    parent = tmp_path / "parent.png"
    Image.new("RGB", (96, 64), "white").save(parent)
    job = {"plans": [str(example_plan)], "styles": ["modern"], "seeds": [1], "profile": PROFILE}
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'state.db'}", storage_url=str(tmp_path / "out"))
    for revise, message in (
        ({"image": str(parent), "mask": str(blank)}, "revise.image is 96×64; the profile renders 64×64"),
        ({"image": str(example_plan), "mask": str(tmp_path / "none.png")}, "no such file"),
        ({"image": "ftp://x/y.png", "mask": str(blank)}, "unsupported URL scheme"),
    ):
        with pytest.raises(InvalidInput, match=message):
            prepare(JobSpec.from_document({**job, "revise": revise}), settings)
    Image.new("RGB", (64, 64), "white").save(parent)
    with pytest.raises(InvalidInput, match="no white pixel"):
        prepare(JobSpec.from_document({**job, "revise": {"image": str(parent), "mask": str(blank)}}), settings)
    with pytest.raises(InvalidInput, match="a revision has no stages"):
        JobSpec.from_document({**job, **STAGES, "revise": {"image": str(parent), "mask": str(blank)}})
    assert not (tmp_path / "state.db").exists()


def test_a_rule_nobody_ran_is_run_by_the_upkeep_once(tmp_path: Path, database_url: str, example_plan: Path) -> None:
    """The worker that ended a rule-picked job's last draft died before running the rule: any worker's upkeep
    runs it, once, however many upkeeps look."""
    from sqlalchemy import select

    from producer.submit import persist, prepare
    from shared.db.models import Artifact, Job, PickGate, Task
    from shared.db.session import make_engine, session_factory
    from shared.db.store import claim_task, finish_task, record_artifacts
    from workers.upkeep import Upkeep

    settings = Settings(database_url=database_url, storage_url=str(tmp_path / "out"))
    sessions = session_factory(make_engine(database_url))
    rule = {**STAGES, "pick": {"by": "adherence", "count": 1}}
    job = prepare(
        JobSpec.from_document(
            {"plans": [str(example_plan)], "styles": ["modern"], "seeds": [1, 2], "profile": PROFILE, **rule}
        ),
        settings,
    )
    with sessions.begin() as session:
        persist(session, job)
        for score, task in zip((0.2, 0.7), job.tasks, strict=True):  # drafts done, the rule never run
            claim_task(session, task.id, "gone")
            record_artifacts(
                session,
                [
                    {
                        "job_id": job.id,
                        "task_id": task.id,
                        "stage": "draft",
                        "plan_digest": task.plan.digest,
                        "style": task.style,
                        "seed": task.seeds[0],
                        "url": f"file:///x/{task.seeds[0]}.png",
                        "sidecar_url": f"file:///x/{task.seeds[0]}.json",
                        "width": 64,
                        "height": 64,
                        "size_bytes": 1,
                        "adherence": score,
                    }
                ],
            )
            finish_task(session, task.id, "gone")
    sent: list[list[str]] = []
    upkeeps = [Upkeep(settings, sessions, f"w{i}", lambda ids, _delay: sent.append(ids)) for i in range(2)]
    assert upkeeps[0].pick_by_rule() != [] and upkeeps[1].pick_by_rule() == []
    with sessions() as session:
        assert session.scalar(select(Job.gate)) is PickGate.CLOSED
        (final,) = session.scalars(select(Task).where(Task.stage == "final"))
        best = session.scalar(select(Artifact.id).where(Artifact.adherence == 0.7))
        assert final.source_id == best and final.seeds == [2]
    assert sent == [[final.id]]


def test_picks_close_by_themselves_once_their_timeout_has_passed(
    tmp_path: Path, database_url: str, example_plan: Path
) -> None:
    from producer.submit import persist, prepare
    from shared.db.models import Job, PickGate
    from shared.db.session import make_engine, session_factory
    from tests.processes import wait_for
    from workers.upkeep import Upkeep

    settings = Settings(database_url=database_url, storage_url=str(tmp_path / "out"))
    sessions = session_factory(make_engine(database_url))
    base = {"plans": [str(example_plan)], "styles": ["modern"], "seeds": [1], "profile": PROFILE}
    soon = {**STAGES, "pick": {"by": "hand", "timeout": 0.0005}}  # 1.8 s
    jobs = [prepare(JobSpec.from_document({**base, **stages}), settings) for stages in (soon, STAGES)]
    with sessions.begin() as session:
        for job in jobs:
            persist(session, job)
    upkeep = Upkeep(settings, sessions, "w", lambda _ids, _delay: None)
    assert upkeep.close_expired_picks() == []
    wait_for(lambda: upkeep.close_expired_picks() == [jobs[0].id], 30, "the picks' timeout to pass")
    with sessions() as session:
        assert [session.get_one(Job, job.id).gate for job in jobs] == [PickGate.CLOSED, PickGate.OPEN]
