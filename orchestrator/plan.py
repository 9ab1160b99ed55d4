"""What ``run`` would do with each job of a manifest, given the store: no network.

create     not in the store yet
resume     in flight, unchanged: continue from its state
unchanged  finished with this same spec: nothing to do
changed    spec or dataset edited while in flight or after it ended: left alone
retry      failed before, and the spec changed or --retry-failed was given
replace    changed, and --replace NAME asked for a fresh start
invalid    its local dataset fails the checks: failed without touching the gateway
conflict   another manifest (still there) submitted a job of this name to this state
           file: a name is a job's identity, so this one is left alone
"""

from __future__ import annotations

import enum
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import anyio
import anyio.to_thread

from orchestrator.datasets import DatasetReport, inspect_dataset
from orchestrator.manifest import JobSpec
from orchestrator.settings import CheckSettings
from orchestrator.states import JobRecord, State

INSPECT_BATCH = 16  # datasets checked per worker-thread hop


class Action(enum.StrEnum):
    CREATE = "create"
    RESUME = "resume"
    UNCHANGED = "unchanged"
    CHANGED = "changed"
    RETRY = "retry"
    REPLACE = "replace"
    INVALID = "invalid"
    CONFLICT = "conflict"

    @property
    def calls_gateway(self) -> bool:
        return self in (Action.CREATE, Action.RESUME, Action.RETRY, Action.REPLACE)


@dataclass(frozen=True)
class PlannedJob:
    spec: JobSpec
    action: Action
    fingerprint: str
    record: JobRecord | None
    report: DatasetReport | None
    validation: DatasetReport | None = None  # fine_tuning's validation dataset

    def describe(self) -> str:
        state = self.record.state.value if self.record else "-"
        if self.action is Action.RESUME:
            return f"resume from {state}"
        if self.action is Action.INVALID and (bad := self.invalid_report) is not None:
            return f"invalid dataset: {bad.summary()}"
        if self.action is Action.CHANGED:
            return f"changed since it was submitted ({state}); left alone without --replace"
        if self.action is Action.CONFLICT and self.record is not None:
            return f"the name is taken by a job of {self.record.manifest}; left alone"
        return self.action.value

    @property
    def invalid_report(self) -> DatasetReport | None:
        """The report of the dataset (or validation dataset) that failed its checks."""
        return next((r for r in (self.report, self.validation) if r and not r.ok), None)

    @property
    def left_alone(self) -> bool:
        """Not driven, and reported: the user must decide."""
        return self.action in (Action.CHANGED, Action.CONFLICT)


async def inspect_datasets(
    specs: Iterable[JobSpec], settings: CheckSettings, concurrency: int = 2
) -> dict[Path, DatasetReport]:
    """Check (and hash) each distinct local dataset once, a few files at a time."""
    paths = sorted({p for s in specs for p in (s.dataset_path, s.validation_path) if p is not None})
    reports: dict[Path, DatasetReport] = {}
    limiter = anyio.CapacityLimiter(concurrency)

    def inspect_all(batch: list[Path]) -> None:
        for path in batch:
            reports[path] = inspect_dataset(path, settings)

    async with anyio.create_task_group() as tg:
        # Several files per worker-thread hop: a thousand small datasets would otherwise
        # cost more in hops than in checking.
        for start in range(0, len(paths), INSPECT_BATCH):
            batch = paths[start : start + INSPECT_BATCH]
            tg.start_soon(partial(anyio.to_thread.run_sync, inspect_all, batch, limiter=limiter))
    return reports


def plan_jobs(
    specs: Iterable[JobSpec],
    reports: Mapping[Path, DatasetReport],
    records: Mapping[str, JobRecord],
    *,
    retry_failed: bool = False,
    replace: Iterable[str] = (),
) -> list[PlannedJob]:
    replace = set(replace)
    planned: list[PlannedJob] = []
    for spec in specs:
        report = reports.get(spec.dataset_path) if spec.dataset_path else None
        validation = reports.get(spec.validation_path) if spec.validation_path else None
        fingerprint = spec.fingerprint(
            report.sha256 if report else None, validation.sha256 if validation else None
        )
        record = records.get(spec.name)
        same = record is not None and record.fingerprint == fingerprint
        if record is None:
            action = Action.CREATE
        elif _taken(record, spec):
            action = Action.CONFLICT
        elif same and not record.state.terminal:
            action = Action.RESUME
        elif same:
            retry = retry_failed and record.state is State.FAILED
            action = Action.RETRY if retry else Action.UNCHANGED
        elif spec.name in replace:
            action = Action.REPLACE
        elif record.state is State.FAILED:
            action = Action.RETRY
        else:
            action = Action.CHANGED
        if any(r is not None and not r.ok for r in (report, validation)) and action in (
            Action.CREATE,
            Action.RETRY,
            Action.REPLACE,
        ):
            action = Action.INVALID
        planned.append(PlannedJob(spec, action, fingerprint, record, report, validation))
    return planned


def replanned(plan: PlannedJob, record: JobRecord) -> PlannedJob:
    """The plan of a stored job that another worker moved after it was planned: followed
    from where it is now, never acted on twice (a retry it made is not made again)."""
    if record.fingerprint != plan.fingerprint:
        action = Action.CHANGED
    else:
        action = Action.UNCHANGED if record.state.terminal else Action.RESUME
    return replace(plan, action=action, record=record)


def _taken(record: JobRecord, spec: JobSpec) -> bool:
    """The job of this name came from another manifest file that still exists (one that
    was moved or deleted hands its jobs over)."""
    if not record.manifest or not spec.manifest or record.manifest == spec.manifest:
        return False
    try:
        return not os.path.samefile(record.manifest, spec.manifest)
    except OSError:
        return False


RecordLoader = Callable[[list[str]], Awaitable[Mapping[str, JobRecord]]]


async def plan_in_chunks(
    specs: Sequence[JobSpec],
    reports: Mapping[Path, DatasetReport],
    load: RecordLoader,
    *,
    retry_failed: bool = False,
    replace: Iterable[str] = (),
    chunk: int = 256,
) -> AsyncIterator[list[PlannedJob]]:
    """``plan_jobs`` a chunk at a time, reading each chunk's records as it goes: a rerun
    of 10,000 jobs starts the first ones while the rest are still being compared with
    the store."""
    replace = tuple(replace)
    for start in range(0, len(specs), chunk):
        part = specs[start : start + chunk]
        records = await load([spec.name for spec in part])
        # In a worker thread: a name taken by another manifest is checked on disk.
        yield await anyio.to_thread.run_sync(
            partial(plan_jobs, part, reports, records, retry_failed=retry_failed, replace=replace)
        )
