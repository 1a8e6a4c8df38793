"""Expansion: the exact task list of a realistic job, and the cost of a large one."""

from __future__ import annotations

import time
import uuid

from producer.expand import expand
from shared.plans import Plan
from shared.spec import JobSpec

JOB_ID = "6f0c1e8a-2b7d-4c1e-9a55-0e4f3c2b1a00"
GROUND = Plan(url="file:///plans/ground.png", name="ground", digest="a" * 64)
FIRST = Plan(url="file:///plans/first.png", name="first", digest="b" * 64)


def spec(seeds: object, seeds_per_task: int = 2) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "villa",
            "plans": [GROUND.url, FIRST.url],
            "styles": ["modern", {"name": "brutalist", "prompt": "raw concrete"}],
            "seeds": seeds,
            "profile": {
                "base": "tiny-sd15",
                "controls": [{"kind": "canny", "scale": 0.9, "start": 0.0, "end": 0.5}],
                "steps": 20,
                "width": 512,
                "height": 512,
                "seeds_per_task": seeds_per_task,
            },
        }
    )


def test_realistic_job_expands_to_the_exact_task_list() -> None:
    tasks = expand(spec([1, 7, 42]), [GROUND, FIRST], JOB_ID)
    summary = [(t.plan.name, t.style, t.seeds) for t in tasks]
    assert summary == [
        ("ground", "modern", (1, 7)),
        ("ground", "modern", (42,)),
        ("ground", "brutalist", (1, 7)),
        ("ground", "brutalist", (42,)),
        ("first", "modern", (1, 7)),
        ("first", "modern", (42,)),
        ("first", "brutalist", (1, 7)),
        ("first", "brutalist", (42,)),
    ]
    first = tasks[0]
    assert first.id == str(uuid.uuid5(uuid.UUID(JOB_ID), f"{'a' * 64}:modern:1"))
    assert [o.rsplit("_", 1)[0] for o in first.outputs] == ["ground/modern/seed-1", "ground/modern/seed-7"]
    assert all(o.endswith(".png") for t in tasks for o in t.outputs)
    # Deterministic: the same inputs give the same ids and keys.
    assert expand(spec([1, 7, 42]), [GROUND, FIRST], JOB_ID) == tasks
    # Unique outputs and ids.
    keys = [o for t in tasks for o in t.outputs]
    assert len(set(keys)) == len(keys) == 12
    assert len({t.id for t in tasks}) == len(tasks)


def test_output_keys_follow_the_inputs_not_the_job() -> None:
    a = expand(spec([1]), [GROUND], JOB_ID)[0]
    b = expand(spec([1]), [GROUND], str(uuid.uuid4()))[0]
    assert a.outputs == b.outputs and a.id != b.id
    other_profile = spec([1]).model_copy(update={"profile": spec([1]).profile.model_copy(update={"steps": 21})})
    assert expand(other_profile, [GROUND], JOB_ID)[0].outputs != a.outputs
    changed_plan = Plan(url=GROUND.url, name="ground", digest="c" * 64)
    assert expand(spec([1]), [changed_plan], JOB_ID)[0].outputs != a.outputs


def test_hundred_thousand_tasks() -> None:
    plans = [Plan(url=f"file:///p/{i}.png", name=f"p{i}", digest=f"{i:064x}") for i in range(50)]
    job = JobSpec.model_validate({**spec({"count": 1000}, 1).model_dump(), "plans": [p.url for p in plans]})
    started = time.perf_counter()
    tasks = expand(job, plans, JOB_ID)
    elapsed = time.perf_counter() - started
    assert len(tasks) == 100_000
    assert len({t.id for t in tasks}) == 100_000
    print(f"expanded 100,000 tasks in {elapsed:.2f} s")
