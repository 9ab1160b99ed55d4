"""Checkpoint transitions per second the stores sustain under many concurrent jobs: SQLite
and PostgreSQL, both group-committed, measured one after the other."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from orchestrator.states import JobRecord, State, Transition
from orchestrator.store import CheckpointStore, SqliteStore, StateLocation, open_store

PATH = [
    State.PENDING,
    State.DATASET_CREATED,
    State.UPLOADED,
    State.DATASET_READY,
    State.FINETUNE_CREATED,
    State.DATASET_ATTACHED,
    State.VALIDATING,
    State.VALIDATED,
    State.TRAINING,
    State.SUCCEEDED,
]


async def _drive(store: CheckpointStore, jobs: int) -> float:
    """Seconds for every job to make the transitions after its creation, all at once;
    the jobs are created and claimed first (a shared store's worker drives only what it
    claimed), outside the measured time."""
    first = [JobRecord(name=f"job-{n:05d}", fingerprint="f" * 64) for n in range(jobs)]
    async with anyio.create_task_group() as tg:
        for record in first:
            transition = Transition(record.name, None, PATH[0], record.updated_at)
            tg.start_soon(store.save, record, transition)
    await store.claim([record.name for record in first])

    async def job(record: JobRecord) -> None:
        old = PATH[0]
        for state in PATH[1:]:
            record = record.evolve(state=state, dataset_id="ds_x", finetune_id="ft_y")
            await store.save(record, Transition(record.name, old, state, record.updated_at))
            old = state

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for record in first:
            tg.start_soon(job, record)
    return time.perf_counter() - started


async def _postgres(jobs: int) -> tuple[float, int]:
    from bench.pg_drivers import URL
    from bench.workers import _drop

    schema = f"bench_store_{int(time.time())}"
    try:
        async with open_store(StateLocation(f"{URL}?schema={schema}")) as store:
            return await _drive(store, jobs), store.commits  # type: ignore[attr-defined]
    finally:
        await anyio.to_thread.run_sync(_drop, schema)


def run(jobs: int = 2000) -> dict[str, Any]:
    transitions = jobs * (len(PATH) - 1)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        store = SqliteStore(Path(tmp) / "state.db")
        try:
            seconds = anyio.run(_drive, store, jobs)
            results: dict[str, Any] = {
                "store_transitions_per_s": round(transitions / seconds),
                "store_commits": store.commits,
                "store_transitions_per_commit": round(transitions / store.commits, 1),
            }
        finally:
            store.close()
    pg_seconds, pg_commits = anyio.run(_postgres, jobs)
    results["pg_store_transitions_per_s"] = round(transitions / pg_seconds)
    results["pg_store_transitions_per_commit"] = round(transitions / pg_commits, 1)
    return results
