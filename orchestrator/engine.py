"""The engine: many lifecycles at once in one task group, each advancing on its own.

The batch command and the daemon both use it; ``run_batch`` simply returns when every
job it was given has reached its goal (arq's burst mode). Cancel requests come from
the store (the control plane), checked between steps and during every wait.

One driver per job: every change to a job (its steps, a cancel, a replace) is made by
the one task that drives it, so two tasks never move the same job. A transient error
is retried, never a verdict; an error handler never raises.

With a shared store (PostgreSQL), one driver in all the workers: a job is driven here
only under its lease. The engine renews its leases, stops driving a job whose lease was
taken over before its next call to the gateway, follows the jobs other workers drive,
and takes over those whose workers went quiet.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import structlog

from orchestrator import fine_tuning, lifecycle
from orchestrator.errors import (
    AuthError,
    GatewayError,
    LeaseLost,
    RetryableError,
    StoreError,
    UploadError,
)
from orchestrator.lifecycle import JobRun, Lifecycle
from orchestrator.notify import events_for
from orchestrator.plan import Action, PlannedJob, replanned
from orchestrator.retry import RetryPolicy
from orchestrator.states import JobRecord, State, Transition, check_transition

log = structlog.get_logger("engine")

# The wait between attempts of a step that failed transiently; how long it may keep
# failing is ``EngineSettings.step_deadline``.
STEP_RETRY = RetryPolicy(initial=1.0, coefficient=2.0, maximum=60.0)
# Leases are renewed every third of their time; a job is not acted on once this share of
# it has passed since the last renewal was sent (a pause, a slow database) until the
# next renewal says the lease is still held.
LEASE_TRUSTED = 0.8


@dataclass(frozen=True)
class Dialect:
    """How a job of one API dialect moves: a step per state (the transition table is
    ``states.TRANSITIONS_BY_API``), the states that wait for a poll, its cancel, and
    its upload (which queues for upload slots instead of a step slot)."""

    steps: Mapping[State, lifecycle.Step]
    polling: frozenset[State]
    cancel: lifecycle.Step
    upload: lifecycle.Step


DIALECTS = {
    "finetune": Dialect(
        lifecycle.STEPS, lifecycle.POLLING_STATES, lifecycle.cancel_job, lifecycle.prepare_dataset
    ),
    "fine_tuning": Dialect(
        fine_tuning.STEPS, fine_tuning.POLLING_STATES, fine_tuning.cancel, fine_tuning.upload_file
    ),
}

# Plans that rewrite a stored job: with a shared store they claim it before applying.
REWRITES = (Action.RETRY, Action.REPLACE, Action.INVALID)


@dataclass
class RunSummary:
    states: dict[str, State] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # failed jobs' reasons
    interrupted: bool = False
    fatal: str | None = None  # bad input found mid-run (a refused key): exit 2
    broken: str | None = None  # the store failed mid-run: exit 1

    def counts(self) -> Counter[str]:
        return Counter(state.value for state in self.states.values())

    def exit_code(self, until: str) -> int:
        if self.fatal:
            return 2
        if self.broken:
            return 1
        if self.interrupted:
            return 130
        goal = {State.SUCCEEDED, State.TRAINING} if until == "submitted" else {State.SUCCEEDED}
        ok = all(s in goal for s in self.states.values()) and not self.changed
        return 0 if ok else 1


class PollTimer:
    """One timer for every job waiting for its next status poll.

    A waiting job sleeps on its own ``wake`` event, and this sets it when the poll is
    due. A due time that moves (a learned phase duration dropped) moves here, in the
    heap, without waking the job: each wake-up costs a task switch and a new wait, and
    with a timer per job, 1,000 jobs learning their durations woke up 4,700 times.
    """

    GRAIN = 0.01  # seconds: polls due this close together are woken together

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, JobRun, anyio.Event]] = []
        self._order = itertools.count()  # ties never compare runs
        self._earliest = math.inf
        self._changed = anyio.Event()
        self.sleeping: dict[str, JobRun] = {}  # by name: the runs waiting on this timer

    def wake_at(self, run: JobRun, due: float) -> None:
        """Wake ``run`` at wall-clock ``due``; an earlier ``wake_at`` for it no longer counts."""
        run.sleeping_until = due
        self.sleeping[run.record.name] = run
        heapq.heappush(self._heap, (due, next(self._order), run, run.wake))
        if due < self._earliest:
            self._changed.set()

    def woke(self, run: JobRun) -> None:
        run.sleeping_until = None
        self.sleeping.pop(run.record.name, None)
        # Superseded entries stay in the heap until due, holding their runs (a cancelled
        # sleeper could be held for days): sweep them when they outnumber the live ones.
        if len(self._heap) > 2 * len(self.sleeping) + 64:
            live = [e for e in self._heap if e[2].sleeping_until == e[0] and e[2].wake is e[3]]
            self._heap[:] = live  # in place: serve() holds this list
            heapq.heapify(self._heap)

    async def serve(self) -> None:
        heap = self._heap
        while True:
            now = time.time()
            while heap and heap[0][0] <= now + self.GRAIN:
                due, _, run, wake = heapq.heappop(heap)
                if run.sleeping_until == due and run.wake is wake:  # else superseded
                    wake.set()
            self._earliest = heap[0][0] if heap else math.inf
            if self._changed.is_set():
                self._changed = anyio.Event()
            with anyio.move_on_after(self._earliest - now):
                await self._changed.wait()


class Engine:
    ADMIT_CHUNK = 64  # jobs started between looks at the step-slot queue
    WAKE_TOLERANCE = 0.25  # seconds a sleeping poll may be off before it is rescheduled

    def __init__(
        self,
        lc: Lifecycle,
        *,
        until: str = "done",
        step_retry: RetryPolicy = STEP_RETRY,
        keep_finished: bool = True,
    ) -> None:
        self.lc = lc
        lc.on_estimate = self._estimate_dropped
        lc.fence = self._fence
        self.until = until
        self.step_retry = step_retry
        # A batch keeps every run for its summary and view; the daemon, which runs for
        # weeks, lets a run go when its job ends.
        self.keep_finished = keep_finished
        self.runs: dict[str, JobRun] = {}
        self.active = 0  # drive() calls under way
        self._driving: set[str] = set()  # names with a driver, started or about to start
        self._idle = anyio.Event()
        self._group: anyio.abc.TaskGroup | None = None  # serve()'s, for cancel-only drivers
        self.stopping = False
        self.fatal: str | None = None
        self.broken: str | None = None
        self.step_slots = anyio.Semaphore(lc.settings.step_concurrency, fast_acquire=True)
        self.timer = PollTimer()
        # Until when (monotonic) this worker's leases are known to hold: forever with
        # one owner; with a shared store, from the first renewal (made before any step).
        self._leases_trusted_until = 0.0 if lc.store.shared else math.inf
        self._renewing = anyio.Lock()
        self._claiming = anyio.Lock()
        self._moved = anyio.Event()  # a followed job was refreshed, or a driver returned

    # ----------------------------------------------------------------- control

    def stop(self) -> None:
        """Take no new steps; in-flight calls finish, every run returns at its next check."""
        self.stopping = True
        self._moved.set()
        for run in self.runs.values():
            run.wake.set()

    def halt(self, message: str) -> None:
        """The store failed: nothing more can be recorded, so nothing more is done."""
        if self.broken is None:
            self.broken = message
            log.error("state store failed; stopping", error=message)
        self.stop()

    async def serve(self) -> None:
        """Forever, beside the jobs: the poll timer, and cancel requests from the store."""
        async with anyio.create_task_group() as tg:
            self._group = tg
            tg.start_soon(self.timer.serve)
            tg.start_soon(self.watch_cancels)
            if self.lc.store.shared:
                tg.start_soon(self.keep_leases)
                tg.start_soon(self.take_over_forever)

    async def watch_cancels(self) -> None:
        """Forever: hand cancel requests in the store to the jobs' drivers."""
        interval = self.lc.settings.cancel_check_interval
        while True:
            try:
                await self._take_cancels()
            except StoreError as exc:
                self.halt(str(exc))
            await self.lc.store.wait_for_cancels(interval)  # a notification comes sooner

    async def _take_cancels(self) -> None:
        store = self.lc.store
        requested = await store.cancel_requests()
        strangers = [name for name in requested if name not in self.runs]
        records = await store.load(strangers) if strangers else {}
        for name in requested:
            run = self.runs.get(name)
            if run is not None and run.elsewhere:
                continue  # its driver, in another worker, applies it
            if run is None:
                record = records.get(name)
                if record is None or record.state.terminal:
                    await store.clear_cancel(name)  # nothing left to cancel
                continue  # else another engine (or a later manifest) drives it
            if run.record.state.terminal:
                await store.clear_cancel(name)
            elif not run.cancel_requested:
                run.cancel_requested = True
                if name in self._driving:
                    run.wake.set()  # its driver cancels it between steps
                elif self._group is not None:  # known but left alone (spec changed)
                    if store.shared and not await store.claim([name]):
                        run.cancel_requested = False  # being driven elsewhere: it cancels
                        continue
                    self._driving.add(name)
                    self._group.start_soon(self.drive, run)

    # ------------------------------------------------------------------- leases

    async def keep_leases(self) -> None:
        """Forever, with a shared store: renew this worker's leases. A loop of its own,
        which nothing else holds up (claiming waits for room; renewing must not)."""
        while True:
            await anyio.sleep(self.lc.store.lease_ttl / 3)
            try:
                await self._renew()
            except StoreError as exc:
                self.halt(str(exc))

    async def take_over_forever(self) -> None:
        """Forever, with a shared store: follow the jobs other workers drive, and take
        over those whose workers went quiet."""
        while True:
            await anyio.sleep(self.lc.store.lease_ttl / 3)
            try:
                await self._take_over()
            except StoreError as exc:
                self.halt(str(exc))

    async def _renew(self) -> None:
        async with self._renewing:
            if time.monotonic() < self._leases_trusted_until - self.lc.store.lease_ttl / 2:
                return  # renewed meanwhile, by another caller
            sent = time.monotonic()
            lost = await self.lc.store.renew()
            self._leases_trusted_until = sent + self.lc.store.lease_ttl * LEASE_TRUSTED
        for name in lost:
            run = self.runs.get(name)
            if run is not None:
                self._lost(run)

    async def _lease_held(self, run: JobRun) -> bool:
        """Whether ``run`` may act now: its lease is known to hold (renewed first when the
        last renewal is too old to vouch for it)."""
        if time.monotonic() >= self._leases_trusted_until:
            await self._renew()
        if not self.lc.store.holds(run.record.name):  # lost, as another engine learned
            self._lost(run)
        return not run.lease_lost

    def _fence(self, run: JobRun) -> None:
        """Called by a step just before a call that must not happen twice (a create, a
        start, an upload): raises unless this worker's lease on the job is known to hold
        right now. No await between this and the call."""
        if self.broken is not None:
            raise StoreError(self.broken)  # nothing more is recorded: nothing more is done
        if not self.lc.store.holds(run.record.name):
            raise LeaseLost(f"{run.record.name}: not this worker's to act on")
        if time.monotonic() >= self._leases_trusted_until:
            raise RetryableError("lease", "lease not renewed in time; confirming it first")

    def _lost(self, run: JobRun) -> None:
        if not run.lease_lost:
            run.lease_lost = True
            run.wake.set()
            run.log.warning("another worker took this job over; no longer driven here")

    async def _take_over(self) -> None:
        """Refresh the jobs followed here, and claim those nobody drives any more."""
        followed = [name for name, run in self.runs.items() if run.elsewhere]
        if not followed or self.stopping:
            return
        fresh = await self.lc.store.load(followed)
        for name in followed:
            run, record = self.runs[name], fresh.get(name)
            if record is None or record.fingerprint != run.fingerprint:
                # Forgotten, or replaced with another spec by a worker whose manifest
                # differs: not this copy's job to wait for or drive.
                run.elsewhere = False
                log.warning("no longer followed: its spec changed elsewhere", job=name)
                continue
            run.record = record
            if self._done(record.state) and not self.keep_finished:
                self.runs.pop(name, None)
        self._moved.set()
        if self._group is not None:
            await self._claim_free(self._group)

    async def _claim_free(self, group: anyio.abc.TaskGroup) -> None:
        """Claim the jobs followed here that no worker drives, ``ADMIT_CHUNK`` at a time
        while this worker has room (``_admission_room``): workers that start together
        share a manifest's jobs, and a dead worker's jobs spread over the living."""
        async with self._claiming:  # one claimer at a time in this worker
            while not self.stopping:
                # The same spec and dataset content only: a worker whose copy of the
                # manifest or of the dataset differs leaves the job to those whose
                # copy matches (checked again on the claimed record).
                candidates = [
                    name
                    for name, run in self.runs.items()
                    if run.elsewhere
                    and not self._done(run.record.state)
                    and run.record.fingerprint == run.fingerprint
                ]
                if not candidates:
                    return
                claimed = await self.lc.store.claim(candidates, limit=self.ADMIT_CHUNK)
                if not claimed:
                    return
                unwanted = []
                for name, record in claimed.items():
                    run = self.runs[name]
                    if self._done(record.state) or record.fingerprint != run.fingerprint:
                        run.record = record  # ended meanwhile, or not this copy's job
                        unwanted.append(name)
                        continue
                    run.take_over(record)
                    self._driving.add(name)
                    group.start_soon(self.drive, run)
                if unwanted:
                    await self.lc.store.release(unwanted)
                # Claim more once these no longer queue here: a worker takes the jobs
                # it can start now, and leaves the rest to workers with room.
                await self._admission_room()
                async with self.lc.small_upload_slots:
                    pass

    async def _claim_plans(self, planned: list[PlannedJob]) -> tuple[list[PlannedJob], set[str]]:
        """With a shared store, every job is followed (the names returned) until it is
        claimed (``_claim_free``), but for a plan that rewrites a stored job (a retry, a
        replace), which claims it first: one leased elsewhere is then only followed, and
        one that moved since it was planned is planned again from what it is now."""
        wanted = [p.spec.name for p in planned if p.record is not None and p.action in REWRITES]
        claimed = await self.lc.store.claim(wanted) if wanted else {}
        result, elsewhere, idle = [], set(), []
        for plan in planned:
            name, record = plan.spec.name, plan.record
            if record is not None and plan.action in REWRITES:
                fresh = claimed.get(name)
                if fresh is None:
                    elsewhere.add(name)
                elif fresh.updated_at != record.updated_at:
                    plan = replanned(plan, fresh)
                    if plan.action not in REWRITES:
                        idle.append(name)
                        elsewhere.add(name)
            elif plan.action is Action.RESUME:
                elsewhere.add(name)
            result.append(plan)
        if idle:
            await self.lc.store.release(idle)
        return result, elsewhere

    # ------------------------------------------------------------------ batches

    async def run_batch(
        self, planned: Iterable[PlannedJob] | AsyncIterable[list[PlannedJob]]
    ) -> RunSummary:
        """Drive every planned job to its end (or to ``until``). ``planned`` may come in
        chunks (``plan.plan_in_chunks``): each is admitted and started as it arrives."""
        summary = RunSummary()
        self.lc.clock.estimates.update(await self.lc.store.load_estimates())
        runs: list[JobRun] = []
        async with anyio.create_task_group() as outer:
            outer.start_soon(self.serve)
            async with anyio.create_task_group() as jobs:
                async for chunk in _chunks(planned):
                    admitted = await self.admit(chunk, summary)
                    await self.start(jobs, admitted)
                    runs += admitted
            await self._until_done(runs)
            outer.cancel_scope.cancel()
        for run in runs:
            summary.states[run.record.name] = run.record.state
            if run.record.state is State.FAILED and run.record.error:
                summary.errors[run.record.name] = run.record.error
        summary.interrupted = (
            self.stopping
            and not (self.fatal or self.broken)
            and any(not self._done(run.record.state) for run in runs)
        )
        summary.fatal, summary.broken = self.fatal, self.broken
        return summary

    async def _until_done(self, runs: list[JobRun]) -> None:
        """Until the jobs driven elsewhere have reached their goal too, and the drivers
        of those taken over here have returned (or ``stop``, and then every driver)."""

        def pending(run: JobRun) -> bool:
            if run.elsewhere:
                return not self._done(run.record.state)
            return run.record.name in self._driving

        while not self.stopping and any(pending(run) for run in runs):
            await self._moved.wait()
            self._moved = anyio.Event()
        if self.stopping:
            await self.wait_idle()

    async def start(self, group: anyio.abc.TaskGroup, runs: list[JobRun]) -> None:
        """Drive ``runs`` in ``group``, ``ADMIT_CHUNK`` at a time (see ``_admission_room``);
        those driven elsewhere are only followed (``keep_leases``)."""
        for index, run in enumerate((r for r in runs if not r.elsewhere), 1):
            self._driving.add(run.record.name)  # admitted runs are owned already
            group.start_soon(self.drive, run)
            if index % self.ADMIT_CHUNK == 0:
                await self._admission_room()
        if self.lc.store.shared:
            await self._claim_free(group)

    async def _admission_room(self) -> None:
        """Return once the jobs already started no longer queue for step slots.

        Starting 10,000 tasks that would only queue keeps the event loop thread busy for
        most of a second, and while it is busy the store's worker thread hardly gets the
        GIL: the first commits of a resume waited 0.6 s. The slots are handed out in
        order, so taking one here means every job queued before has had its turn. Jobs
        waiting on a poll or an upload do not queue here and never hold the others back.
        """
        await anyio.lowlevel.checkpoint()  # the jobs just started take their slots first
        async with self.step_slots:
            pass

    async def admit(self, planned: Iterable[PlannedJob], summary: RunSummary) -> list[JobRun]:
        """Apply each plan to the store; return the runs to drive (and, with a shared
        store, those to follow: ``elsewhere``)."""
        planned = list(planned)
        shared = self.lc.store.shared
        elsewhere: set[str] = set()
        if shared:
            planned, elsewhere = await self._claim_plans(planned)
        applied: list[JobRecord | None] = [None] * len(planned)

        async def apply(index: int, plan: PlannedJob) -> None:
            try:
                applied[index] = await self._apply(plan)
            except LeaseLost:  # another worker has it: followed from the store
                applied[index] = JobRecord(plan.spec.name, plan.fingerprint, api=plan.spec.api)
                elsewhere.add(plan.spec.name)
            if shared and plan.action is Action.CREATE:
                elsewhere.add(plan.spec.name)  # recorded free: claimed as there is room

        async def moved(index: int, record: JobRecord, manifest: str) -> None:
            # Its manifest was moved: the job follows the file that names it now.
            applied[index] = record = replace(record, manifest=manifest)  # times stay
            await self.lc.store.save(record)

        # Plans that write go concurrently, so the store commits them in a few batches;
        # resumed and unchanged jobs need no task at all.
        async with anyio.create_task_group() as tg:
            for index, plan in enumerate(planned):
                record = plan.record
                if plan.spec.name in elsewhere:
                    applied[index] = record
                elif record is not None and plan.action in (Action.RESUME, Action.UNCHANGED):
                    # A shared store's job keeps the manifest path it was first sent from:
                    # each machine may keep its copy elsewhere.
                    if record.manifest != plan.spec.manifest and not shared:
                        tg.start_soon(moved, index, record, plan.spec.manifest)
                    else:
                        applied[index] = record
                elif plan.left_alone:
                    applied[index] = record
                else:
                    tg.start_soon(apply, index, plan)
        runs: list[JobRun] = []
        for plan, record in zip(planned, applied, strict=True):
            if plan.left_alone:
                summary.changed.append(plan.spec.name)
                log.warning("left alone", job=plan.spec.name, reason=plan.describe())
            if record is None:  # a replace that could not cancel what it replaces
                summary.changed.append(plan.spec.name)
                continue
            if plan.action is Action.CONFLICT:
                continue  # another manifest's job: not this engine's to know
            run = JobRun(
                plan.spec,
                record,
                plan.report,
                elsewhere=record.name in elsewhere,
                validation=plan.validation,
            )
            if self.keep_finished or not record.state.terminal:
                self.runs[plan.spec.name] = run  # the jobs the engine knows, for views
            if run.elsewhere:
                runs.append(run)  # followed until it ends, or taken over
            elif not self._done(record.state) and not plan.left_alone:
                # Owned from now, before any await: a cancel seen meanwhile waits for
                # this driver instead of starting one of its own.
                self._driving.add(record.name)
                runs.append(run)
            else:
                summary.states[record.name] = record.state
                if record.state is State.FAILED and record.error:
                    summary.errors[record.name] = record.error
        return runs

    async def _apply(self, plan: PlannedJob) -> JobRecord | None:
        """Write what the plan says to the store; None when a replace must wait because
        the finetune it replaces could not be cancelled."""
        spec, old = plan.spec, plan.record
        store = self.lc.store

        def fresh(**changes: Any) -> JobRecord:
            return JobRecord(
                name=spec.name,
                fingerprint=plan.fingerprint,
                manifest=spec.manifest,
                base_url=self.lc.client.identity,
                provider=spec.provider,
                model=spec.model,
                api=spec.api,
                content_sha256=plan.report.sha256 if plan.report else None,
                **changes,
            )

        if plan.action is Action.CREATE:
            record = fresh()
            await store.save(record, Transition(spec.name, None, State.PENDING, record.created_at))
            return record
        carried: dict[str, Any] = {}
        if old is not None:
            if not old.state.terminal:
                # Replacing a job in flight (or failing it for an invalid new dataset):
                # its finetune is cancelled first, whatever becomes of the new spec.
                old = await self._cancel_replaced(JobRun(spec, old, plan.report))
                if old is None:
                    return None
            # A job that failed on our side replays its keys and adopts what the gateway
            # made; any other retry, a replace or an invalid dataset starts a new attempt.
            adopt = plan.action is Action.RETRY and old.adoptable
            finetunes = old.abandoned_finetunes
            if old.finetune_id and not adopt:
                finetunes = (*finetunes, old.finetune_id)
            carried = {
                "attempt": old.attempt if adopt else old.attempt + 1,
                "abandoned_datasets": old.abandoned_datasets,
                "abandoned_finetunes": finetunes,
                "created_at": old.created_at,
            }
        if plan.action is Action.INVALID:
            bad = plan.invalid_report
            assert bad is not None
            record = fresh(state=State.FAILED, error=bad.summary(), **carried)
            detail = "invalid dataset"
            log.error("job failed", job=spec.name, error=record.error)
            self.lc.metrics.failed(spec.name, record.error or detail)
        else:
            assert old is not None and plan.action in (Action.RETRY, Action.REPLACE)
            await store.clear_cancel(spec.name)
            record = fresh(**carried)
            detail = plan.action.value
        old_state = old.state if old is not None else None
        if old_state is not None:
            check_transition(old_state, record.state, record.api)
        await store.save(
            record,
            Transition(spec.name, old_state, record.state, record.updated_at, detail),
            events=events_for(record, old_state, spec.notify, self.lc.settings.notify_milestones),
        )
        return record

    async def _cancel_replaced(self, run: JobRun) -> JobRecord | None:
        """Cancel a job in flight before its record is replaced; None when the gateway
        could not be told (the job is then left as it is, to be replaced later)."""
        try:
            await DIALECTS[run.record.api].cancel(self.lc, run)
        except GatewayError as exc:
            log.error(
                "could not cancel the job being replaced; left as it is",
                job=run.record.name,
                error=str(exc),
            )
            return None
        return run.record

    def _done(self, state: State) -> bool:
        return state.terminal or (self.until == "submitted" and state.submitted)

    # -------------------------------------------------------------------- a job

    async def drive(self, run: JobRun) -> None:
        """Advance one job until it is done, cancelled, or the engine stops."""
        name = run.record.name
        self.active += 1
        self._driving.add(name)
        try:
            await self._drive(run)
        finally:
            if run.lease_lost:
                run.elsewhere = True  # followed again, and taken back if its worker dies
            elif self.lc.store.shared and not self.stopping and not self._done(run.record.state):
                # Left undone (a failure that could not be recorded): free for any worker.
                with anyio.CancelScope(shield=True):
                    try:
                        await self.lc.store.release([name])
                        run.elsewhere = True
                    except StoreError as exc:
                        self.halt(str(exc))
            self._driving.discard(name)
            if not self.keep_finished and run.record.state.terminal:
                self.runs.pop(name, None)
            self.active -= 1
            self._moved.set()
            if not self._driving:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Until no job has a driver (after ``stop``, the in-flight steps have ended)."""
        while self._driving:
            if self._idle.is_set():
                self._idle = anyio.Event()
            await self._idle.wait()

    def is_driving(self, name: str) -> bool:
        return name in self._driving

    async def _drive(self, run: JobRun) -> None:
        failures, failing_since, failing_step = 0, 0.0, None
        while not self._done(run.record.state) and not self.stopping and not run.lease_lost:
            dialect = DIALECTS[run.record.api]
            step: lifecycle.Step | None = dialect.cancel if run.cancel_requested else None
            if step is None:
                state = run.record.state
                if state in dialect.polling and not await self._wait_for_poll(run):
                    continue
                step = dialect.steps[state]
            error = await self._guarded(run, step)
            if step is dialect.cancel and run.record.state.terminal:
                await self._clear_cancel(run)
                return
            if error is None:
                failures = 0
                continue
            if step is not failing_step:  # a cancel after a failing /start starts afresh
                failures, failing_step = 0, step
            failures += 1
            failing_since = failing_since if failures > 1 else time.monotonic()
            deadline = self._step_deadline(run, step)
            if time.monotonic() - failing_since > deadline:
                if step is dialect.cancel:  # the user's word stands; the note says why
                    await self._end_unconfirmed(
                        run, f"cancel not confirmed in {deadline:g}s: {error}"
                    )
                else:
                    await self._fail(
                        run,
                        f"gave up after {deadline:g}s of transient errors: {error}",
                        adoptable=True,
                    )
                return
            delay = self.step_retry.delay(failures, error.retry_after, self.lc.rng)
            await self._sleep(run, max(delay, self.lc.settings.poll.initial))

    def _step_deadline(self, run: JobRun, step: lifecycle.Step) -> float:
        """How long a step may keep failing transiently. A ``/start`` whose outcome is
        unknown is looked at for as long as a training may take (the gateway may be
        training it meanwhile)."""
        if run.record.state is State.VALIDATED and step is not lifecycle.cancel_job:
            return self.lc.settings.poll.training_deadline
        return self.lc.settings.step_deadline

    async def _clear_cancel(self, run: JobRun) -> None:
        try:
            await self.lc.store.clear_cancel(run.record.name)
        except StoreError as exc:
            self.halt(str(exc))

    async def _guarded(self, run: JobRun, step: lifecycle.Step) -> RetryableError | None:
        """Run a step; a permanent problem fails the job, a transient one is returned.
        Never raises (but for cancellation): one job's trouble is not the batch's."""
        try:
            dialect = DIALECTS[run.record.api]
            if step is dialect.upload and run.spec.dataset_path is not None:
                if await self._lease_held(run):
                    await step(self.lc, run)  # bounded by its upload slots instead
            else:
                async with self.step_slots:
                    if run.cancel_requested and step is not dialect.cancel:
                        return None  # asked while it waited for a slot: cancel first
                    if await self._lease_held(run):
                        await step(self.lc, run)
        except LeaseLost:
            self._lost(run)  # its save was refused: the job's new worker carries on
        except RetryableError as exc:
            run.log.warning("step will be retried", error=str(exc))
            return exc
        except StoreError as exc:
            self.halt(str(exc))
        except AuthError as exc:
            # The key is wrong for every job: stop everything rather than fail them all.
            self.fatal = f"gateway {self.lc.client.base_url} refused the API key: {exc.message}"
            self.stop()
        except (GatewayError, UploadError) as exc:
            await self._fail(run, str(exc))
        except OSError as exc:
            await self._fail(run, f"cannot read dataset: {exc}")
        except Exception as exc:  # a bug must cost one job, not the batch
            run.log.exception("internal error")
            await self._fail(run, f"internal error: {type(exc).__name__}: {exc}", adoptable=True)
        return None

    async def _end_unconfirmed(self, run: JobRun, detail: str) -> None:
        """A cancel the gateway never confirmed: the job is cancelled here, saying so."""
        try:
            await self.lc.transition(
                run, State.CANCELLED, detail, intent=None, next_poll_at=None, error=detail
            )
            await self.lc.store.clear_cancel(run.record.name)
        except LeaseLost:
            self._lost(run)
        except StoreError as exc:
            self.halt(str(exc))

    async def _fail(self, run: JobRun, message: str, **changes: Any) -> None:
        """Record a failure; never raises (it runs in the error handler)."""
        if run.record.state.terminal:
            return
        try:
            await self.lc.transition(
                run, State.FAILED, "error", error=message, intent=None, **changes
            )
        except LeaseLost:
            self._lost(run)
        except StoreError as exc:
            self.halt(str(exc))
        except Exception:
            run.log.exception("could not record the failure", error=message)

    async def _wait_for_poll(self, run: JobRun) -> bool:
        """Sleep until the job's next poll is due; False if woken to stop or cancel.

        The timer may wake it early when the due time can no longer be computed (see
        ``_estimate_dropped``): it is then recomputed."""
        while True:
            due = lifecycle.poll_due(self.lc, run)
            if due is None or due - time.time() <= self.timer.GRAIN:
                return True
            self.timer.wake_at(run, due)
            try:
                await run.wake.wait()
            finally:
                self.timer.woke(run)
            if self.stopping or run.cancel_requested or run.lease_lost:
                return False
            run.wake = anyio.Event()

    def _estimate_dropped(self, state: State) -> None:
        # The sleepers of that state whose next poll moves get a new due time; none of
        # them wakes for it. The estimate creeps down a little with most jobs that
        # finish: the tolerance keeps the timer's heap from growing with each.
        for run in list(self.timer.sleeping.values()):
            if run.record.state is state and run.sleeping_until is not None:
                due = lifecycle.poll_due(self.lc, run)
                if due is None:
                    run.wake.set()
                elif abs(due - run.sleeping_until) > self.WAKE_TOLERANCE:
                    self.timer.wake_at(run, due)

    async def _sleep(self, run: JobRun, seconds: float) -> None:
        if seconds <= 0:
            return
        with anyio.move_on_after(seconds):
            await run.wake.wait()
        if run.wake.is_set() and not self.stopping:
            run.wake = anyio.Event()


async def _chunks(
    planned: Iterable[PlannedJob] | AsyncIterable[list[PlannedJob]],
) -> AsyncIterator[list[PlannedJob]]:
    if isinstance(planned, AsyncIterable):
        async for chunk in planned:
            yield chunk
    else:
        yield list(planned)
