"""One job's lifecycle: a small async function per step, and the table of which step
runs in which state.

Rules every step keeps:
- the gateway is the truth: a phase ends only on a status the gateway stated. An answer
  we could not read (``UnreadableAnswer``, a 5xx, a stray 404) or a status we do not
  know is *not observed yet*: the job keeps its state and looks again, within the
  phase's deadline;
- each transition is durable (``Lifecycle.transition``) before the next side effect;
- before a non-idempotent call (the two creates, ``/start``) the intent is persisted,
  with the transition before it where there is one, and the creates carry an
  ``Idempotency-Key`` derived from the job and its attempt, so a create whose answer was
  lost is replayed with the same key;
- what the gateway hands back is observed before it is acted on: a finetune past
  ``created`` is never re-attached (that would reset it) but adopted where it is, and a
  dataset already uploaded is not uploaded again;
- a persisted ``start_finetune`` intent whose call may have gone out is resolved by
  observing: "started" only on a status of training or later, ``/start`` again only
  while the gateway says validated, and anything else means look again.
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
from functools import cached_property
from typing import Any

import anyio
import structlog

from orchestrator.datasets import DatasetReport
from orchestrator.errors import (
    AuthError,
    ConflictError,
    GatewayError,
    PermanentError,
    RetryableError,
    UnreadableAnswer,
    UploadError,
)
from orchestrator.gateway import Finetune, GatewayClient
from orchestrator.manifest import JobSpec
from orchestrator.metrics import Metrics
from orchestrator.notify import events_for
from orchestrator.openai_api import FineTuningClient, FineTuningJob, Route
from orchestrator.sessions import HttpSession
from orchestrator.settings import EngineSettings
from orchestrator.states import JobRecord, State, Transition, check_transition
from orchestrator.statuses import Phase, StatusMap, suggestion
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
    validation: DatasetReport | None = None  # fine_tuning's validation dataset, checked
    elsewhere: bool = False  # another worker holds its lease: followed here, not driven
    lease_lost: bool = False  # taken over while this process drove it

    def take_over(self, record: JobRecord) -> None:
        """This process drives the job from ``record`` on; what it knew is forgotten."""
        self.record, self.elsewhere, self.lease_lost = record, False, False
        self.signed_url, self.last_poll_at, self.unsent_intent = None, None, None
        self.wake = anyio.Event()

    @cached_property
    def fingerprint(self) -> str:
        """The spec and content this process has for the job (fixed for the run)."""
        return self.spec.fingerprint(
            self.report.sha256 if self.report else None,
            self.validation.sha256 if self.validation else None,
        )

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

    def left(self, run: JobRun, state: State) -> None:
        """``run`` is no longer in ``state``: a scout's place goes to the next job."""
        scouts = self.scouts.get(self.key(run, state))
        if scouts is not None:
            scouts.discard(run.record.name)

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
    jobs: FineTuningClient | None = None  # the OpenAI-compatible dialect's client
    # Told when an estimate drops, so jobs sleeping in that state can poll sooner.
    on_estimate: Callable[[State], None] = lambda state: None
    # Applied to every text stored (errors, details): the log redactor's ``text``.
    redact: Callable[[str], str] = str
    # Called just before a call that must not happen twice; raises when this process
    # may not act for the job now (a shared store's lease, ``Engine._fence``).
    fence: Callable[[JobRun], None] = lambda run: None
    # key -> (lock, holders): an entry lives only while some job holds or awaits it.
    _content_locks: dict[str, tuple[anyio.Lock, list[int]]] = field(default_factory=dict)

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
        check_transition(old, new, run.record.api)
        if changes.get("error"):
            changes["error"] = self.redact(changes["error"])
        if detail:
            detail = self.redact(detail)
        record = run.record.evolve(state=new, **changes)
        transition = Transition(record.name, old, new, record.updated_at, detail)
        events = events_for(record, old, run.spec.notify, self.settings.notify_milestones)
        await self.store.save(record, transition, dataset=shares, events=events)
        run.record = record
        if old in POLLING_STATES and new is not old:
            self.clock.left(run, old)
        if "intent" in changes:
            run.unsent_intent = changes["intent"]
        self.metrics.transition(old.value, new.value)
        if new is State.FAILED:
            self.metrics.failed(record.name, record.error or detail or "failed")
            run.log.error("job failed", old=old.value, detail=detail, error=record.error)
            return
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
        lock, holders = self._content_locks.setdefault(key, (anyio.Lock(), [0]))
        holders[0] += 1
        try:
            async with lock:
                yield
        finally:
            holders[0] -= 1
            if not holders[0]:
                del self._content_locks[key]


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
    key = content_key(lc.client.identity, run.spec, run.report)
    async with lc.content_lock(key):
        if run.cancel_requested:
            return  # asked while it waited: the driver cancels instead
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
                if run.cancel_requested:
                    return
                await _create_and_upload(lc, run)
            if run.record.state is State.FAILED:
                return
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
    lc.fence(run)
    created = await lc.client.create_dataset(
        run.spec.dataset_name,
        run.spec.provider,
        run.spec.model,
        idempotency_key=idempotency_key(run.record, CREATE_DATASET),
    )
    run.signed_url = created.signed_url
    await lc.transition(run, State.DATASET_CREATED, dataset_id=created.id, intent=None)


async def _uploaded_already(lc: Lifecycle, run: JobRun) -> str | None:
    """The object key of a dataset the gateway shows as uploaded (an idempotent replay
    after a lost state file), or None. A gateway that cannot say is uploaded to again:
    that costs bytes, never a wrong result."""
    assert run.record.dataset_id is not None
    try:
        dataset = await lc.client.get_dataset(run.record.dataset_id)
    except AuthError:
        raise
    except GatewayError:
        return None
    if dataset.id != run.record.dataset_id or not dataset.s3_path:
        return None
    return dataset.s3_path


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
            uploaded = await _uploaded_already(lc, run)
            if uploaded is not None:
                await lc.transition(
                    run, State.UPLOADED, "already uploaded on the gateway", s3_key=uploaded
                )
                return
        assert run.signed_url is not None
        lc.fence(run)
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
        if run.record.content_sha256 and result.sha256 != run.record.content_sha256:
            # What went up is not what was checked: never share or train on it.
            assert run.record.dataset_id is not None
            await _abandon(lc, run, run.record.dataset_id)
            await lc.transition(
                run,
                State.FAILED,
                "dataset changed while uploading",
                error=f"dataset changed while uploading: {run.spec.dataset_path} no longer "
                "has the content that was checked; run again to check and upload it anew",
            )
            return
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
    """dataset_ready -> finetune_created. A lost answer is replayed with the same key."""
    if run.record.intent != CREATE_FINETUNE:
        await lc.persist(run, intent=CREATE_FINETUNE)
    lc.fence(run)
    run.unsent_intent = None  # from here on, the gateway may have made it
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
    """finetune_created -> dataset_attached, or wherever the gateway already has it.

    The create may have handed back a finetune made earlier (a replay after a lost state
    file, a rerun elsewhere): attaching would reset it, so it is observed first, and
    attached only while the gateway says it is created (an unknown status is looked at
    again)."""
    assert run.record.finetune_id and run.record.dataset_id
    seen = await _observe(lc, run)
    if seen.phase is not Phase.CREATED:
        await _adopt(lc, run, seen, "found on the gateway")
        return
    await lc.client.update_finetune(run.record.finetune_id, run.record.dataset_id)
    await lc.transition(run, State.DATASET_ATTACHED)


async def start_validation(lc: Lifecycle, run: JobRun) -> None:
    """dataset_attached -> validating."""
    assert run.record.finetune_id
    # Timed from before the call: the gateway's clock starts somewhere inside it, so a
    # learned duration errs long (one poll finds it done), never short (polls too early).
    now = time.time()
    try:
        await lc.client.start_validation(run.record.finetune_id)
    except ConflictError:
        seen = await _observe(lc, run)
        if seen.phase is Phase.CREATED:
            raise
        await _adopt(lc, run, seen, "found on the gateway")
        return
    await lc.transition(
        run,
        State.VALIDATING,
        phase_started_at=now,
        phase_adopted=False,
        poll_attempt=0,
        next_poll_at=now + lc.clock.poll_delay(run, lc.settings.poll.initial, State.VALIDATING),
    )


async def await_validation(lc: Lifecycle, run: JobRun) -> None:
    """validating -> validated (or later) | failed | cancelled, or the next poll."""
    seen = await _poll(lc, run)
    if seen is None:
        return
    if seen.phase is Phase.VALIDATED:
        await _phase_ended(lc, run)
        await lc.transition(
            run,
            State.VALIDATED,
            next_poll_at=None,
            intent=START_FINETUNE,
            **_status_fields(lc, run, seen),
        )
    elif seen.phase in (Phase.VALIDATING, Phase.CREATED, None):
        await _schedule_poll(lc, run, seen)
    else:
        await _adopt(lc, run, seen, "validation")


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
    lc.fence(run)
    run.unsent_intent = None
    now = time.time()  # before the call, as in start_validation
    try:
        await lc.client.start_finetune(record.finetune_id, run.spec.override_model)
    except (RetryableError, ConflictError):
        # The outcome is unknown (lost or unreadable answer) or the gateway disagrees
        # (409): look before doing anything else.
        if await _already_started(lc, run):
            return
        raise
    await lc.transition(
        run,
        State.TRAINING,
        intent=None,
        phase_started_at=now,
        training_started_at=now,
        phase_adopted=False,
        poll_attempt=0,
        next_poll_at=now + lc.clock.poll_delay(run, lc.settings.poll.initial, State.TRAINING),
    )


async def _already_started(lc: Lifecycle, run: JobRun) -> bool:
    """Observe the finetune and adopt what the gateway says; False only while it says
    validated (``/start`` may be sent). Unreadable or unknown: raises, to look again."""
    seen = await _observe(lc, run)
    if seen.phase is Phase.VALIDATED:
        return False
    if seen.phase is None:
        await lc.persist(run, **_status_fields(lc, run, seen))
        raise UnreadableAnswer(
            "get_finetune", f"status {seen.finetune.status!r} is unknown; observing again"
        )
    await _adopt(lc, run, seen, "start observed on the gateway")
    return True


async def await_training(lc: Lifecycle, run: JobRun) -> None:
    """training -> succeeded | failed | cancelled, or the next poll."""
    seen = await _poll(lc, run)
    if seen is None:
        return
    if seen.phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.VALIDATION_FAILED, Phase.CANCELLED):
        if seen.phase is Phase.SUCCEEDED:
            await _phase_ended(lc, run)
        await _adopt(lc, run, seen, None)
    else:
        await _schedule_poll(lc, run, seen)


async def cancel_job(lc: Lifecycle, run: JobRun) -> None:
    """Any state -> cancelled; the finetune is cancelled on the gateway if it exists.
    A finetune that ended before the cancel reached it ends the job as it ended. A
    refusal (409) while the gateway shows it training, or a status we do not know, is
    tried again; before training nothing runs that we would not start ourselves, so the
    job is cancelled here."""
    record = run.record
    sent_maybe = record.intent == CREATE_FINETUNE and run.unsent_intent != CREATE_FINETUNE
    if record.finetune_id is None and sent_maybe:
        # The create may have happened with its answer lost: replay it (same key) to
        # learn the id, so what the gateway made is cancelled rather than orphaned. A
        # refusal says nothing was made: then there is nothing to cancel there.
        try:
            await create_finetune(lc, run)
        except PermanentError as exc:
            if isinstance(exc, AuthError):
                raise
            run.log.info("create refused on replay; nothing to cancel", error=str(exc))
        record = run.record
    status: dict[str, Any] = {}
    if record.finetune_id:
        lc.fence(run)
        try:
            await lc.client.cancel_finetune(record.finetune_id)
        except ConflictError as exc:
            seen = await _observe(lc, run)
            if seen.phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.VALIDATION_FAILED):
                await _adopt(lc, run, seen, "ended before the cancel")
                return
            if seen.phase in (Phase.TRAINING, None):
                await lc.persist(run, **_status_fields(lc, run, seen))
                raise UnreadableAnswer(
                    exc.endpoint, f"refused while {seen.finetune.status}: {exc.message}", 409
                ) from None
            status = _status_fields(lc, run, seen)
    await lc.transition(
        run, State.CANCELLED, "cancel requested", intent=None, next_poll_at=None, **status
    )


# ------------------------------------------------------------- observing the gateway


@dataclass(frozen=True)
class Observation:
    """The finetune (or fine_tuning job) as the gateway stated it, and the phase its
    status maps to (None: a status we do not know, which is no verdict)."""

    finetune: Finetune | FineTuningJob
    phase: Phase | None

    @property
    def fine_tuned_model(self) -> str | None:
        found = self.finetune
        return found.fine_tuned_model if isinstance(found, FineTuningJob) else found.slug


async def _observe(lc: Lifecycle, run: JobRun) -> Observation:
    """GET the finetune. Raises ``RetryableError`` when the gateway's answer says
    nothing we can use: a 404 or other refusal for an id it gave us is no statement
    about the finetune either."""
    record = run.record
    assert record.finetune_id
    found: Finetune | FineTuningJob
    try:
        if record.api == "fine_tuning":
            assert lc.jobs is not None
            route = Route(run.spec.provider, run.spec.virtual_key or None)
            found = await lc.jobs.get_job(record.finetune_id, route)
        else:
            found = await lc.client.get_finetune(record.finetune_id)
    except (RetryableError, AuthError):
        raise
    except GatewayError as exc:
        raise UnreadableAnswer(exc.endpoint, exc.message, exc.status) from None
    finally:
        run.last_poll_at = time.time()
        lc.metrics.polled()
    return Observation(found, lc.statuses.phase_of(found.status))


async def _poll(lc: Lifecycle, run: JobRun) -> Observation | None:
    """Observe a job in a polling state; None when nothing could be read (the next poll
    is then scheduled, with backoff, inside the phase's deadline)."""
    try:
        return await _observe(lc, run)
    except RetryableError as exc:
        lc.metrics.unobserved()
        run.log.warning("could not read the finetune; observing again", error=str(exc))
        await _schedule_poll(lc, run, None)
        return None


def _status_fields(lc: Lifecycle, run: JobRun, seen: Observation) -> dict[str, Any]:
    """The remote status to record, and since when it has been unknown (None: known)."""
    status = seen.finetune.status
    if seen.phase is not None:
        return {"remote_status": status, "unknown_status_since": None}
    record = run.record
    since = record.unknown_status_since
    if since is None or record.remote_status != status:
        since = time.time()
        run.log.info("unknown gateway status; observing again", remote_status=status)
    elif (
        time.time() - since >= lc.settings.poll.unknown_status_notice
        and status not in run.warned_statuses
    ):
        run.warned_statuses.add(status or "")
        waiting = Phase.VALIDATING if record.state is State.VALIDATING else Phase.TRAINING
        run.log.warning(
            "gateway status still unknown; add it to the manifest",
            remote_status=status,
            unknown_for=round(time.time() - since),
            manifest_line=suggestion(status or "", waiting),
        )
    return {"remote_status": status, "unknown_status_since": since}


async def _adopt(lc: Lifecycle, run: JobRun, seen: Observation, detail: str | None) -> None:
    """Move the job to where the gateway says its finetune is (a phase other than
    created), from any state that observes."""
    finetune, phase = seen.finetune, seen.phase
    fields = _status_fields(lc, run, seen)
    now = time.time()
    if phase is None:
        await lc.persist(run, **fields)
        raise UnreadableAnswer(
            "get_finetune", f"status {finetune.status!r} is unknown; observing again"
        )
    if phase in (Phase.FAILED, Phase.VALIDATION_FAILED):
        what = "training" if phase is Phase.FAILED else "validation"
        message = finetune.failure_message() or finetune.status
        await lc.transition(
            run,
            State.FAILED,
            f"{what} failed",
            error=f"{what} failed: {message}",
            usage=finetune.usage(),
            intent=None,
            next_poll_at=None,
            **fields,
        )
    elif phase is Phase.CANCELLED:
        await lc.transition(
            run,
            State.CANCELLED,
            "cancelled on the gateway",
            intent=None,
            next_poll_at=None,
            **fields,
        )
    elif phase is Phase.SUCCEEDED:
        await lc.transition(
            run,
            State.SUCCEEDED,
            detail,
            fine_tuned_model=seen.fine_tuned_model,
            usage=finetune.usage(),
            intent=None,
            next_poll_at=None,
            **fields,
        )
    elif phase is Phase.VALIDATED:
        await lc.transition(
            run, State.VALIDATED, detail, intent=START_FINETUNE, next_poll_at=None, **fields
        )
    else:  # validating (or created again after validation) / training: follow it there
        state = State.TRAINING if phase is Phase.TRAINING else State.VALIDATING
        if state is State.TRAINING:
            fields["training_started_at"] = now  # as first seen: it began before
        if run.record.state is not state:
            await lc.transition(
                run,
                state,
                detail,
                intent=None,
                phase_started_at=now,
                phase_adopted=True,
                poll_attempt=0,
                next_poll_at=now,
                **fields,
            )


async def _schedule_poll(
    lc: Lifecycle, run: JobRun, seen: Observation | None, hint: float | None = None
) -> None:
    """The next poll of a validating or training job, or ``failed`` past its deadline.
    ``hint``: when the gateway expects the job to finish (wall clock), if it says."""
    record = run.record
    training = record.state is State.TRAINING
    what = "training" if training else "validation"
    poll = lc.settings.poll
    deadline = poll.training_deadline if training else poll.validation_deadline
    fields = _status_fields(lc, run, seen) if seen is not None else {}
    now = time.time()
    started = record.phase_started_at or now
    if now - started > deadline:
        await lc.transition(
            run,
            State.FAILED,
            f"{what} deadline",
            error=f"{what} did not finish within {deadline:g}s "
            f"(last status {fields.get('remote_status', record.remote_status)})",
            adoptable=True,  # the gateway may still be at it: a retry follows it again
            **fields,
        )
        return
    attempt = record.poll_attempt + 1
    delay = poll.policy().backoff(attempt)
    estimate = lc.clock.estimate(run)
    if seen is None:
        pass  # nothing read: back off, whatever the estimate says
    elif estimate is None:
        delay = min(lc.clock.poll_delay(run, delay), poll.maximum)
    else:
        expected = lc.clock.expected_end(run)
        # Near the expected end: ask again soon rather than after a long backoff step.
        delay = expected - now if expected is not None else min(delay, max(0.05 * estimate, 0.2))
    if seen is not None and hint is not None and hint > now:
        delay = min(hint - now, poll.maximum)  # its own estimate beats ours
    delay = max(delay, poll.initial)  # never sooner than --poll-interval after the last
    await lc.persist(run, poll_attempt=attempt, next_poll_at=now + delay, **fields)


async def _phase_ended(lc: Lifecycle, run: JobRun) -> None:
    """A phase seen ending *successfully*: its duration teaches the clock. A failure
    may come at any time and says nothing about how long the phase takes."""
    if run.record.phase_adopted:
        return
    estimate = lc.clock.finished(run, time.time())
    if estimate is not None:
        await lc.store.save_estimate(lc.clock.key(run), estimate)
        lc.on_estimate(run.record.state)


def poll_due(lc: Lifecycle, run: JobRun) -> float | None:
    """When a job in a polling state should next ask: its schedule, or sooner by the
    clock, but never sooner than ``--poll-interval`` after its last poll."""
    expected = lc.clock.expected_end(run)
    # The clock, when it knows the phase, beats the blind schedule either way: sooner
    # than a long backoff step, and later than a first poll that could only find "busy".
    due = expected if expected is not None else run.record.next_poll_at
    if due is not None and run.last_poll_at is not None:
        due = max(due, run.last_poll_at + lc.settings.poll.initial)
    return due


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
