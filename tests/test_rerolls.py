"""Re-rolls: images that do not follow their plan are rendered again with the next seeds of their family, at
most N times, the best of each chain kept; a style pack's seed family gives its images seeds of their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.client import Farm
from producer.views import ArtifactView
from shared.config import Settings
from shared.db.models import Artifact, Job
from shared.db.rerolls import reroll
from shared.db.status import JobStatus
from shared.errors import InvalidInput
from shared.spec import MAX_SEED, JobSpec, SeedFamily

PROFILE = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "controls": [{"kind": "canny"}]}


def test_a_family_continues_the_jobs_seeds_and_gives_each_reroll_seeds_no_image_uses() -> None:
    ranged = SeedFamily(range(10, 14), 4)
    assert list(ranged.seeds()) == [10, 11, 12, 13]
    assert [ranged.reroll(11, attempt) for attempt in (1, 2)] == [15, 19]  # the range continued, a block a round
    listed = SeedFamily([5, 100], 2)
    assert [listed.reroll(5, 1), listed.reroll(100, 1), listed.reroll(5, 2)] == [101, 102, 103]
    pack = SeedFamily([42, 7, 9], 2)  # a pack's family: its first seeds are the images', the rest re-rolls'
    assert list(pack.seeds()) == [42, 7] and pack.reroll(42, 1) == 9 and pack.reroll(7, 1) == 43
    assert list(SeedFamily([7], 3).seeds()) == [7, 8, 9]  # more images than listed seeds: on from the largest
    family = SeedFamily(range(0, 6), 6)
    members = [*family.seeds(), *(family.reroll(seed, attempt) for seed in family.seeds() for attempt in (1, 2, 3))]
    assert len(set(members)) == len(members)
    with pytest.raises(ValueError, match="not one of"):
        family.reroll(7, 1)


def test_a_reroll_rule_is_checked_before_anything_is_stored() -> None:
    job = {"plans": ["a.png"], "styles": ["modern"], "seeds": [1, 2], "profile": PROFILE}
    spec = JobSpec.from_document({**job, "reroll": {"below": 0.3}})
    assert spec.reroll is not None and spec.reroll.times == 2
    for bad, why in (
        ({"below": 0}, "greater than 0"),
        ({"below": 0.5, "times": 9}, "less than or equal to 8"),
        ({"below": 0.5, "every": 2}, "every"),
    ):
        with pytest.raises(InvalidInput, match=why):
            JobSpec.from_document({**job, "reroll": bad})
    with pytest.raises(InvalidInput, match="run past"):
        JobSpec.from_document({**job, "seeds": [MAX_SEED - 1, MAX_SEED], "reroll": {"below": 0.5}})
    staged = {"draft": {"steps": 1}, "pick": {"by": "adherence"}, "final": {}}
    with pytest.raises(InvalidInput, match="only a single-pass render re-rolls"):
        JobSpec.from_document({**job, **staged, "reroll": {"below": 0.5}})
    with pytest.raises(InvalidInput, match="duplicate seed"):
        JobSpec.from_document({**job, "styles": [{"name": "p", "prompt": "a room", "seeds": [3, 3]}]})


def _chains(artifacts: list[ArtifactView]) -> dict[int, list[ArtifactView]]:
    """Each image rendered with the job's own seed, and its re-rolls after it, by the first one's id."""
    chains = {a.id: [a] for a in artifacts if a.reroll_of is None}
    for artifact in sorted(artifacts, key=lambda a: a.id):
        if artifact.reroll_of is not None:
            chains[artifact.reroll_of].append(artifact)
    return chains


def test_low_adherence_images_are_rerolled_with_their_familys_seeds_the_best_kept_and_never_more_than_asked(
    database_url: str, models_dir: Path, tmp_path: Path, example_plan: Path
) -> None:
    """With every image under the threshold, each is re-rolled exactly `times` times (the rule ends, and a
    redelivered task adds nothing); each chain keeps its best, the others point at it, and the sheet shows the
    kept one, marked. The same job with the threshold between its two first images' scores re-rolls only the
    lower one."""
    settings = Settings(
        database_url=database_url, models_dir=models_dir, broker_url=None, storage_url=str(tmp_path / "renders")
    )
    job = {"plans": [str(example_plan)], "styles": ["modern"], "seeds": {"start": 1, "count": 2}, "profile": PROFILE}
    with Farm(settings) as farm:
        every = farm.submit({**job, "reroll": {"below": 1.0, "times": 2}})
        assert farm.status(every).status is JobStatus.SUCCEEDED
        chains = _chains(farm.results(every))
        assert sorted(len(chain) for chain in chains.values()) == [3, 3]
        assert {chain[0].seed: [a.seed for a in chain[1:]] for chain in chains.values()} == {1: [3, 5], 2: [4, 6]}
        sheet = farm.sheet(every)
        for cell, chain in zip(sheet.rows[0].cells, sorted(chains.values(), key=lambda c: c[0].seed), strict=True):
            best = max(chain, key=lambda a: (a.adherence or 0.0, -a.id))
            assert [a.id for a in chain if a.superseded_by is None] == [best.id]
            assert {a.superseded_by for a in chain if a.id != best.id} == {best.id}
            assert cell.seed == chain[0].seed and cell.rerolls == 2 and cell.artifact is not None
            assert cell.artifact.id == best.id
        assert "re-rolled 2×" in "".join(farm_page(sheet))
        last = max((a for chain in chains.values() for a in chain), key=lambda a: a.id)
        with farm.sessions.begin() as session:  # its task delivered again: no new re-roll, the same best
            spec = JobSpec.model_validate(session.get_one(Job, every).spec)
            assert reroll(session, every, spec, session.get_one(Artifact, last.id).task_id) == []
        assert _chains(farm.results(every)) == chains
        delivered = farm.download(every, tmp_path / "delivered")
        assert len(delivered) == 2 * 2  # the kept images and their sidecars

        firsts = sorted((chain[0] for chain in chains.values()), key=lambda a: a.adherence or 0.0)
        low, high = (a.adherence or 0.0 for a in firsts)
        assert low < high, "two seeds that score alike cannot show the threshold"
        some = farm.submit({**job, "reroll": {"below": (low + high) / 2, "times": 1}})
        assert farm.status(some).status is JobStatus.SUCCEEDED
        rerolled = {chain[0].seed: len(chain) - 1 for chain in _chains(farm.results(some)).values()}
        assert rerolled == {firsts[0].seed: 1, firsts[1].seed: 0}


def farm_page(sheet: object) -> list[str]:
    """The sheet as the HTML file `archfarm sheet` writes, without its images."""
    from producer.sheet import Sheet, sheet_html

    assert isinstance(sheet, Sheet)
    return list(sheet_html(sheet, {a.id: b"" for a in sheet.artifacts}))


def test_a_packs_seed_family_gives_its_images_their_seeds_whatever_the_jobs(
    embedded_settings: Settings, example_plan: Path
) -> None:
    pack = {"name": "project-x", "prompt": "a warm oak living room", "seeds": [901, 77]}
    job = {"plans": [str(example_plan)], "styles": [pack, "modern"], "seeds": [1, 2, 3], "profile": PROFILE}
    with Farm(embedded_settings) as farm:
        job_id = farm.submit(job)
        seeds = {(a.style, a.seed) for a in farm.results(job_id)}
        assert seeds == {("project-x", s) for s in (901, 77, 902)} | {("modern", s) for s in (1, 2, 3)}
        rows = {row.style: [cell.seed for cell in row.cells] for row in farm.sheet(job_id).rows}
        assert rows == {"project-x": [901, 77, 902], "modern": [1, 2, 3]}
        assert all(cell.artifact is not None for row in farm.sheet(job_id).rows for cell in row.cells)
