"""The engine's one timer for waiting jobs: each is woken at its latest due time only."""

from __future__ import annotations

import time

import anyio
import pytest

from orchestrator.engine import PollTimer
from orchestrator.lifecycle import JobRun
from orchestrator.manifest import JobSpec
from orchestrator.states import JobRecord

pytestmark = pytest.mark.anyio


def run_named(name: str) -> JobRun:
    spec = JobSpec(name, "openai", "m", "vk", {}, None, None, "k")
    return JobRun(spec, JobRecord(name=name, fingerprint="f"))


async def test_runs_wake_in_the_order_of_their_due_times() -> None:
    timer = PollTimer()
    woken: list[str] = []
    runs = {name: run_named(name) for name in "abc"}

    async def sleeper(run: JobRun) -> None:
        await run.wake.wait()
        woken.append(run.record.name)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(timer.serve)
            now = time.time()
            for name, delay in (("a", 0.10), ("b", 0.03), ("c", 0.20)):
                timer.wake_at(runs[name], now + delay)
            async with anyio.create_task_group() as sleepers:
                for run in runs.values():
                    sleepers.start_soon(sleeper, run)
            tg.cancel_scope.cancel()
    assert woken == ["b", "a", "c"]


async def test_a_moved_due_time_replaces_the_earlier_one() -> None:
    timer = PollTimer()
    later, sooner = run_named("later"), run_named("sooner")
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(timer.serve)
            now = time.time()
            timer.wake_at(later, now + 0.02)
            timer.wake_at(later, now + 0.30)  # moved later: the first no longer counts
            timer.wake_at(sooner, now + 3600)
            timer.wake_at(sooner, now + 0.05)  # moved sooner: the timer re-arms
            await sooner.wake.wait()
            assert not later.wake.is_set()
            await later.wake.wait()
            assert time.time() >= now + 0.30 - PollTimer.GRAIN
            tg.cancel_scope.cancel()
