"""One job's lifecycle: a small async function per step, and the table of which step
runs in which state.

Rules every step keeps:
- each transition is durable (``Lifecycle.transition``) before the next side effect;
- before a non-idempotent call (the two creates, ``/start``) the intent is persisted,
  with the transition before it where there is one (a save of its own costs a commit),
  and the creates carry an ``Idempotency-Key`` derived from the job and its attempt;
- a persisted ``start_finetune`` intent whose call may have gone out (in an earlier
  attempt or process) is resolved by *observing* the finetune first: ``/start`` is sent
  again only while the gateway still says the dataset is validated.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from orchestrator.datasets import DatasetReport
from orchestrator.errors import ConflictError, RetryableError, UploadError
from orchestrator.gateway import Finetune, GatewayClient
from orchestrator.manifest import JobSpec
from orchestrator.metrics import Metrics
from orchestrator.sessions import HttpSession
from orchestrator.settings import EngineSettings
from orchestrator.states import JobRecord, State, Transition, check_transition
from orchestrator.statuses import Phase, StatusMap
from orchestrator.store import CheckpointStore, SharedDataset
from orchestrator.upload import upload_dataset

CREATE_DATASET = "create_dataset"
CREATE_FINETUNE = "create_finetune"
START_FINETUNE = "start_finetune"

_job_log = structlog.get_logger("job")
# Transitions logged at INFO: what a user follows. The steps between them are logged at
# DEBUG (`--verbose`); every transition is in the state file's history either way.
_MILESTONES = frozenset(
    {State.VALIDATING, State.TRAINING, State.SUCCEEDED, State.FAILED, State.CANCELLED}
)


@dataclass
class JobRun:
    """A job while this process drives it: the durable record plus what is not stored."""

    spec: JobSpec
    record: JobRecord
    report: DatasetReport | None = None
    signed_url: str | None = None  # never stored: a credential, and it expires
    warned_statuses: set[str] = field(default_factory=set)
    wake: anyio.Event = field(default_factory=anyio.Event)
    cancel_requested: bool = False
    last_poll_at: float | None = None  # wall clock of the last status GET
    sleeping_until: float | None = None  # wall clock its poll is due, while it waits
    unsent_intent: str | None = None  # persisted by this process; its call not sent yet

    @property
    def log(self) -> Any:
        r = self.record
        return _job_log.bind(
            job=r.name, state=r.state.value, dataset_id=r.dataset_id, finetune_id=r.finetune_id
        )


@dataclass
class PhaseClock:
    """How long validation and training take, learned from jobs that finished them.

    A perfect poller asks once, as a phase ends. Jobs of one provider and model take
    similar times, so once one of them has finished a phase the others first poll when
    it is expected to end, not on a blind backoff. The estimate is the shortest phase
    seen (kept in the store, so the next run starts warm). One job in ``PROBE_EVERY``
    polls a little earlier, so the estimate keeps creeping toward the truth.

    While nothing is known, the first ``SCOUTS`` jobs of a phase poll on the normal
    backoff and the rest wait ``WAIT_FACTOR`` times longer: a scout finishing wakes them
    to poll once, at the expected end. A lone job is always a scout.
    """

    PROBE_EVERY = 16
    PROBE_LEAD = 0.85
    SCOUTS = 4
    WAIT_FACTOR = 8.0
    estimates: dict[str, float] = field(default_factory=dict)
    scouts: dict[str, set[str]] = field(default_factory=dict)

    def poll_delay(self, run: JobRun, backoff: float, state: State | None = None) -> float:
        """The wait before the next poll of ``state`` (default: the job's) while the
        phase's duration is unknown."""
        scouts = self.scouts.setdefault(self.key(run, state), set())
        if run.record.name in scouts or len(scouts) < self.SCOUTS:
            scouts.add(run.record.name)
            return backoff
        return backoff * self.WAIT_FACTOR

    @staticmethod
    def key(run: JobRun, state: State | None = None) -> str:
        phase = (state or run.record.state).value
        return f"{phase}|{run.spec.provider}|{run.spec.model}"

    def estimate(self, run: JobRun) -> float | None:
        return self.estimates.get(self.key(run))

    def expected_end(self, run: JobRun) -> float | None:
        """When to poll next by the estimate, or None when it has nothing to say."""
        estimate = self.estimate(run)
        started = run.record.phase_started_at
        if estimate is None or started is None:
            return None
        due = started + estimate
        asked = run.last_poll_at
        probe = zlib.crc32(run.record.name.encode()) % self.PROBE_EVERY == 0
        if probe and (asked is None or asked < started + estimate * self.PROBE_LEAD):
            # Early, once; a probe that found the phase still running then polls at
            # the estimate like the others, not on the blind backoff.
            due = started + estimate * self.PROBE_LEAD
        if asked is not None and asked >= due:
            return None  # already asked after that moment: the backoff decides now
        return due

    def finished(self, run: JobRun, now: float) -> float | None:
        """Record a phase seen finished; the new estimate when it dropped noticeably."""
        started = run.record.phase_started_at
        if started is None:
            return None
        key, seen = self.key(run), now - started
        old = self.estimates.get(key)
        if old is not None and seen >= old * 0.98:
            return None
        self.estimates[key] = seen
        return seen


@dataclass
class Lifecycle:
    """What the steps need: the gateway, the storage client, the store, the settings."""

    client: GatewayClient
    storage: HttpSession
    store: CheckpointStore
    statuses: StatusMap
    settings: EngineSettings
    metrics: Metrics
    upload_slots: anyio.Semaphore
    small_upload_slots: anyio.Semaphore
    rng: random.Random = field(default_factory=random.Random)
    clock: PhaseClock = field(default_factory=PhaseClock)
    # Told when an estimate drops, so jobs sleeping in that state can poll sooner.
    on_estimate: Callable[[State], None] = lambda state: None
    _content_locks: dict[str, anyio.Lock] = field(default_factory=dict)

    async def transition(
        self,
        run: JobRun,
        new: State,
        detail: str | None = None,
        *,
        shares: SharedDataset | None = None,
        **changes: Any,
    ) -> None:
        """Move ``run`` to ``new`` once that is durable; ``shares`` is a dataset the job
        has made reusable by later jobs, saved in the same commit."""
        old = run.record.state
        check_transition(old, new)
        record = run.record.evolve(state=new, **changes)
        transition = Transition(record.name, old, new, record.updated_at, detail)
        await self.store.save(record, transition, dataset=shares)
        run.record = record
        if "intent" in changes:
            run.unsent_intent = changes["intent"]
        self.metrics.transition(old.value, new.value)
        level = logging.INFO if new in _MILESTONES or detail else logging.DEBUG
        if _job_log.is_enabled_for(level):
            run.log.log(level, "transition", old=old.value, detail=detail)

    async def persist(self, run: JobRun, **changes: Any) -> None:
        """A same-state update: an intent, a poll schedule, a remote status."""
        record = run.record.evolve(**changes)
        await self.store.save(record)
        run.record = record
        if "intent" in changes:
            run.unsent_intent = changes["intent"]

    @asynccontextmanager
    async def content_lock(self, key: str) -> AsyncIterator[None]:
        lock = self._content_locks.setdefault(key, anyio.Lock())
        async with lock:
            yield


def idempotency_key(record: JobRecord, call: str) -> str:
    """Stable across restarts of one attempt; new for a retried or replaced job."""
    seed = f"{record.name}|{record.fingerprint}|{call}|{record.attempt}"
    return "orch-" + hashlib.sha256(seed.encode()).hexdigest()[:40]


def content_key(gateway: str, spec: JobSpec, report: DatasetReport | None) -> str:
    """Jobs with the same key can share one uploaded dataset: same bytes (or S3 object),
    same provider and model, same gateway."""
    if spec.s3_key is not None:
        return f"{gateway}|s3:{spec.s3_key}|{spec.provider}|{spec.model}"
    assert report is not None
    return f"{gateway}|sha256:{report.sha256}|{spec.provider}|{spec.model}"


# ---------------------------------------------------------------------- the steps


async def prepare_dataset(lc: Lifecycle, run: JobRun) -> None:
    """pending | dataset_created | uploaded -> dataset_ready."""
    key = content_key(lc.client.base_url, run.spec, run.report)
    async with lc.content_lock(key):
        if run.record.state in (State.PENDING, State.DATASET_CREATED):
            shared = await lc.store.find_dataset(key)
            if shared is not None and run.record.state is State.PENDING:
                await lc.transition(
                    run,
                    State.DATASET_READY,
                    f"reused dataset {shared.dataset_id}",
                    dataset_id=shared.dataset_id,
                    s3_key=shared.s3_key,
                    intent=CREATE_FINETUNE,
                )
                return
        if run.spec.s3_key is None and run.record.state is not State.UPLOADED:
            # The slot is taken before the dataset is created, so the URL is used fresh.
            size = run.report.size if run.report else 0
            small = size < lc.settings.upload.small_file_bytes
            async with lc.small_upload_slots if small else lc.upload_slots:
                await _create_and_upload(lc, run)
        elif run.record.state is State.PENDING or run.record.intent == CREATE_DATASET:
            await _create_dataset(lc, run)
        s3_key = run.spec.s3_key or run.record.s3_key
        assert run.record.dataset_id is not None and s3_key is not None
        await lc.client.update_dataset(run.record.dataset_id, s3_key)
        await lc.transition(
            run,
            State.DATASET_READY,
            shares=SharedDataset(key, run.record.dataset_id, s3_key),
            s3_key=s3_key,
            intent=CREATE_FINETUNE,
        )


async def _create_dataset(lc: Lifecycle, run: JobRun) -> None:
    # A pending job knows of no dataset, and its create carries the job's idempotency
    # key, so "pending" already says what a crash may have left: no intent to save.
    if run.record.state is not State.PENDING and run.record.intent != CREATE_DATASET:
        await lc.persist(run, intent=CREATE_DATASET)
    created = await lc.client.create_dataset(
        run.spec.dataset_name,
        run.spec.provider,
        run.spec.model,
        idempotency_key=idempotency_key(run.record, CREATE_DATASET),
    )
    run.signed_url = created.signed_url
    await lc.transition(run, State.DATASET_CREATED, dataset_id=created.id, intent=None)


async def _create_and_upload(lc: Lifecycle, run: JobRun) -> None:
    assert run.spec.dataset_path is not None
    for _ in range(lc.settings.upload.max_fresh_urls + 1):
        if run.signed_url is None:
            # Resumed without a URL (never stored): ask again with the same key. A gateway
            # that honours it returns the same dataset with a URL; one that does not makes
            # a new dataset, and the old one is recorded as abandoned.
            previous = run.record.dataset_id if run.record.state is State.DATASET_CREATED else None
            await _create_dataset(lc, run)
            if previous and previous != run.record.dataset_id:
                await _abandon(lc, run, previous)
        assert run.signed_url is not None
        progress = lc.metrics.upload_progress(run.record.name, run.report.size if run.report else 0)
        try:
            result = await upload_dataset(
                lc.storage,
                run.signed_url,
                run.spec.dataset_path,
                lc.settings.upload,
                progress=progress,
                rng=lc.rng,
            )
        except UploadError as exc:
            if not exc.expired:
                raise
            # No endpoint re-signs a URL: a fresh one needs a fresh dataset, so a new
            # attempt (and idempotency key); the loop then abandons the expired one.
            await lc.persist(run, attempt=run.record.attempt + 1)
            run.signed_url = None
            continue
        finally:
            lc.metrics.upload_finished(run.record.name)
        lc.metrics.uploaded(result.size, result.seconds)
        run.log.info(
            "uploaded",
            bytes=result.size,
            seconds=round(result.seconds, 3),
            attempts=result.attempts,
            md5=result.md5,
        )
        await lc.transition(run, State.UPLOADED, s3_key=result.key, upload_md5=result.md5)
        return
    raise UploadError(f"signed URL expired {lc.settings.upload.max_fresh_urls + 1} times in a row")


async def _abandon(lc: Lifecycle, run: JobRun, dataset_id: str) -> None:
    await lc.persist(run, abandoned_datasets=(*run.record.abandoned_datasets, dataset_id))
    run.log.warning("dataset abandoned", abandoned=dataset_id)


async def create_finetune(lc: Lifecycle, run: JobRun) -> None:
    """dataset_ready -> finetune_created."""
    if run.record.intent != CREATE_FINETUNE:
        await lc.persist(run, intent=CREATE_FINETUNE)
    spec = run.spec
    created = await lc.client.create_finetune(
        spec.name,
        spec.virtual_key,
        spec.provider,
        spec.model,
        spec.hyperparameters,
        idempotency_key=idempotency_key(run.record, CREATE_FINETUNE),
    )
    await lc.transition(run, State.FINETUNE_CREATED, finetune_id=created.id, intent=None)


async def attach_dataset(lc: Lifecycle, run: JobRun) -> None:
    """finetune_created -> dataset_attached."""
    assert run.record.finetune_id and run.record.dataset_id
    await lc.client.update_finetune(run.record.finetune_id, run.record.dataset_id)
    await lc.transition(run, State.DATASET_ATTACHED)


async def start_validation(lc: Lifecycle, run: JobRun) -> None:
    """dataset_attached -> validating."""
    assert run.record.finetune_id
    # Timed from before the call: the gateway's clock starts somewhere inside it, so a
    # learned duration errs long (one poll finds it done), never short (polls too early).
    now = time.time()
    await lc.client.start_validation(run.record.finetune_id)
    await lc.transition(
        run,
        State.VALIDATING,
        phase_started_at=now,
        poll_attempt=0,
        next_poll_at=now + lc.clock.poll_delay(run, lc.settings.poll.initial, State.VALIDATING),
    )


async def await_validation(lc: Lifecycle, run: JobRun) -> None:
    """validating -> validated | failed, or the next poll scheduled."""
    finetune, phase = await _observe(lc, run)
    if phase is not None and phase is not Phase.VALIDATING and phase is not Phase.CREATED:
        await _phase_ended(lc, run)
    if phase is Phase.VALIDATED or phase in (Phase.TRAINING, Phase.SUCCEEDED):
        await lc.transition(
            run,
            State.VALIDATED,
            remote_status=finetune.status,
            next_poll_at=None,
            intent=START_FINETUNE,
        )
    elif not await _ended_badly(lc, run, finetune, phase, "validation"):
        await _schedule_poll(lc, run, finetune, lc.settings.poll.validation_deadline, "validation")


async def _ended_badly(
    lc: Lifecycle, run: JobRun, finetune: Finetune, phase: Phase | None, what: str
) -> bool:
    """Record a failed or cancelled phase; False when the phase has not ended that way."""
    if phase in (Phase.FAILED, Phase.VALIDATION_FAILED):
        message = finetune.failure_message() or finetune.status
        await lc.transition(
            run,
            State.FAILED,
            f"{what} failed",
            remote_status=finetune.status,
            error=f"{what} failed: {message}",
            next_poll_at=None,
        )
        return True
    if phase is Phase.CANCELLED:
        await lc.transition(
            run,
            State.CANCELLED,
            "cancelled on the gateway",
            remote_status=finetune.status,
            next_poll_at=None,
        )
        return True
    return False


async def start_training(lc: Lifecycle, run: JobRun) -> None:
    """validated -> training. The one call that must never happen twice."""
    record = run.record
    assert record.finetune_id
    # An earlier attempt or process may have sent /start: look first.
    sent_maybe = record.intent == START_FINETUNE and run.unsent_intent != START_FINETUNE
    if sent_maybe and await _already_started(lc, run):
        return
    if record.intent != START_FINETUNE:
        await lc.persist(run, intent=START_FINETUNE)
    run.unsent_intent = None
    now = time.time()  # before the call, as in start_validation
    try:
        await lc.client.start_finetune(record.finetune_id, run.spec.override_model)
    except (RetryableError, ConflictError):
        # The outcome is unknown (lost response) or the gateway disagrees (409):
        # look before doing anything else.
        if await _already_started(lc, run):
            return
        raise
    await lc.transition(
        run,
        State.TRAINING,
        intent=None,
        phase_started_at=now,
        poll_attempt=0,
        next_poll_at=now + lc.clock.poll_delay(run, lc.settings.poll.initial, State.TRAINING),
    )


async def _already_started(lc: Lifecycle, run: JobRun) -> bool:
    """Observe the finetune; adopt a start that happened. False only while still validated."""
    finetune, phase = await _observe(lc, run)
    if phase is Phase.VALIDATED:
        return False
    if phase in (Phase.VALIDATING, Phase.CREATED, Phase.VALIDATION_FAILED):
        # Not started, and not startable: the dataset is no longer validated.
        await lc.transition(
            run,
            State.FAILED,
            "not startable",
            intent=None,
            remote_status=finetune.status,
            error=f"finetune is {finetune.status} on the gateway; it cannot be started",
        )
        return True
    now = time.time()
    await lc.transition(
        run,
        State.TRAINING,
        "start observed on the gateway",
        intent=None,
        remote_status=finetune.status,
        phase_started_at=now,
        poll_attempt=0,
        next_poll_at=now,
    )
    return True


async def await_training(lc: Lifecycle, run: JobRun) -> None:
    """training -> succeeded | failed | cancelled, or the next poll scheduled."""
    finetune, phase = await _observe(lc, run)
    if phase in (Phase.SUCCEEDED, Phase.FAILED):
        await _phase_ended(lc, run)
    if phase is Phase.SUCCEEDED:
        await lc.transition(
            run,
            State.SUCCEEDED,
            remote_status=finetune.status,
            fine_tuned_model=finetune.slug,
            next_poll_at=None,
        )
    elif not await _ended_badly(lc, run, finetune, phase, "training"):
        await _schedule_poll(lc, run, finetune, lc.settings.poll.training_deadline, "training")


async def cancel_job(lc: Lifecycle, run: JobRun) -> None:
    """Any state -> cancelled; the finetune is cancelled on the gateway if it exists."""
    record = run.record
    status = record.remote_status
    if record.finetune_id:
        try:
            await lc.client.cancel_finetune(record.finetune_id)
        except ConflictError:
            finetune, phase = await _observe(lc, run)
            if phase is Phase.SUCCEEDED:
                await lc.transition(
                    run,
                    State.SUCCEEDED,
                    "finished before the cancel",
                    fine_tuned_model=finetune.slug,
                    remote_status=finetune.status,
                )
                return
            if phase in (Phase.FAILED, Phase.VALIDATION_FAILED):
                await lc.transition(
                    run,
                    State.FAILED,
                    "failed before the cancel",
                    remote_status=finetune.status,
                    error=finetune.failure_message() or finetune.status,
                )
                return
            status = finetune.status
    await lc.transition(
        run,
        State.CANCELLED,
        "cancel requested",
        intent=None,
        remote_status=status,
        next_poll_at=None,
    )


async def _observe(lc: Lifecycle, run: JobRun) -> tuple[Finetune, Phase | None]:
    assert run.record.finetune_id
    finetune = await lc.client.get_finetune(run.record.finetune_id)
    run.last_poll_at = time.time()
    lc.metrics.polled()
    phase = lc.statuses.phase_of(finetune.status)
    if phase is None and finetune.status not in run.warned_statuses:
        run.warned_statuses.add(finetune.status or "")
        run.log.warning(
            "unknown gateway status; treating it as still in progress",
            remote_status=finetune.status,
        )
    return finetune, phase


async def _schedule_poll(
    lc: Lifecycle, run: JobRun, finetune: Finetune, deadline: float, what: str
) -> None:
    record = run.record
    now = time.time()
    started = record.phase_started_at or now
    if now - started > deadline:
        await lc.transition(
            run,
            State.FAILED,
            f"{what} deadline",
            remote_status=finetune.status,
            error=f"{what} did not finish within {deadline:g}s (last status {finetune.status})",
        )
        return
    attempt = record.poll_attempt + 1
    delay = lc.settings.poll.policy().backoff(attempt)
    estimate = lc.clock.estimate(run)
    if estimate is None:
        delay = min(lc.clock.poll_delay(run, delay), lc.settings.poll.maximum)
    else:
        expected = lc.clock.expected_end(run)
        # Near the expected end: ask again soon rather than after a long backoff step.
        delay = expected - now if expected is not None else min(delay, max(0.05 * estimate, 0.2))
    await lc.persist(
        run, remote_status=finetune.status, poll_attempt=attempt, next_poll_at=now + delay
    )


async def _phase_ended(lc: Lifecycle, run: JobRun) -> None:
    estimate = lc.clock.finished(run, time.time())
    if estimate is not None:
        await lc.store.save_estimate(lc.clock.key(run), estimate)
        lc.on_estimate(run.record.state)


def poll_due(lc: Lifecycle, run: JobRun) -> float | None:
    """When a job in a polling state should next ask: its schedule, or sooner by the clock."""
    expected = lc.clock.expected_end(run)
    # The clock, when it knows the phase, beats the blind schedule either way: sooner
    # than a long backoff step, and later than a first poll that could only find "busy".
    return expected if expected is not None else run.record.next_poll_at


Step = Callable[[Lifecycle, JobRun], Awaitable[None]]

STEPS: dict[State, Step] = {
    State.PENDING: prepare_dataset,
    State.DATASET_CREATED: prepare_dataset,
    State.UPLOADED: prepare_dataset,
    State.DATASET_READY: create_finetune,
    State.FINETUNE_CREATED: attach_dataset,
    State.DATASET_ATTACHED: start_validation,
    State.VALIDATING: await_validation,
    State.VALIDATED: start_training,
    State.TRAINING: await_training,
}

POLLING_STATES = frozenset({State.VALIDATING, State.TRAINING})
