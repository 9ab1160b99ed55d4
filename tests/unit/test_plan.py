from __future__ import annotations

from collections.abc import Mapping

import pytest

from orchestrator.manifest import JobSpec
from orchestrator.plan import Action, PlannedJob, plan_in_chunks, plan_jobs
from orchestrator.states import JobRecord, State

pytestmark = pytest.mark.anyio


def spec(name: str, model: str = "m") -> JobSpec:
    return JobSpec(
        name=name,
        provider="openai",
        model=model,
        virtual_key="vk",
        hyperparameters={},
        override_model=None,
        dataset_path=None,
        s3_key=f"datasets/{name}.jsonl",
    )


async def test_chunks_plan_like_one_pass_and_read_only_their_own_records() -> None:
    specs = [spec(f"job-{i}") for i in range(7)]
    stored = {
        "job-1": JobRecord("job-1", specs[1].fingerprint(None), State.TRAINING),
        "job-4": JobRecord("job-4", specs[4].fingerprint(None), State.SUCCEEDED),
        "job-5": JobRecord("job-5", spec("job-5", model="old").fingerprint(None), State.FAILED),
    }
    asked: list[list[str]] = []

    async def load(names: list[str]) -> Mapping[str, JobRecord]:
        asked.append(names)
        return {n: stored[n] for n in names if n in stored}

    chunks: list[list[PlannedJob]] = [
        chunk async for chunk in plan_in_chunks(specs, {}, load, chunk=3)
    ]
    assert asked == [["job-0", "job-1", "job-2"], ["job-3", "job-4", "job-5"], ["job-6"]]
    in_chunks = [p for chunk in chunks for p in chunk]
    assert in_chunks == plan_jobs(specs, {}, stored)
    assert [p.action for p in in_chunks] == [
        Action.CREATE,
        Action.RESUME,
        Action.CREATE,
        Action.CREATE,
        Action.UNCHANGED,
        Action.RETRY,
        Action.CREATE,
    ]
    assert [a for a in Action if a.calls_gateway] == [
        Action.CREATE,
        Action.RESUME,
        Action.RETRY,
        Action.REPLACE,
    ]
