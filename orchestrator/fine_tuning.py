"""The steps of an ``api: fine_tuning`` job (the OpenAI-compatible dialect), on the same
record, store, intents, polling and adoption rules as ``lifecycle``; its transition
table is ``states.TRANSITIONS_BY_API["fine_tuning"]``.

There is no idempotency key in this dialect: exactly-once comes from a tag and a look
before acting. Each job is created with ``metadata`` naming it (job, attempt, spec),
and every create first lists the jobs with those tags and follows the one it finds (an
answer lost, a crash, a state file lost). A file is named after its content: shared by
the jobs of one store, and looked for by name and size before it is sent (far back when
this job's own upload may have happened, among the newest files otherwise).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio

from orchestrator.datasets import DatasetReport
from orchestrator.errors import AuthError, NotFoundError, PermanentError, UnreadableAnswer
from orchestrator.lifecycle import (
    CREATE_FINETUNE,
    JobRun,
    Lifecycle,
    _adopt,
    _phase_ended,
    _poll,
    _schedule_poll,
    _status_fields,
)
from orchestrator.openai_api import MAX_FILE_BYTES, FineTuningClient, FineTuningJob, Route
from orchestrator.states import JobRecord, State, Transition
from orchestrator.statuses import Phase
from orchestrator.store import SharedDataset
from orchestrator.upload import FileBody

UPLOAD_FILE = "upload_file"  # the intent of a file upload that may have happened


def route(run: JobRun) -> Route:
    return Route(run.spec.provider, run.spec.virtual_key or None)


def tags(record: JobRecord) -> dict[str, str]:
    """What a created job carries so that it can be found again: this job, this attempt,
    this spec (``manifest.RESERVED_METADATA`` keeps users' keys apart)."""
    return {
        "orchestrator_job": record.name,
        "orchestrator_attempt": str(record.attempt),
        "orchestrator_spec": record.fingerprint[:16],
    }


def file_name(report: DatasetReport) -> str:
    return f"ft-{report.sha256[:32]}.jsonl"


def _jobs(lc: Lifecycle) -> FineTuningClient:
    assert lc.jobs is not None, "an engine for fine_tuning jobs has a FineTuningClient"
    return lc.jobs


# ---------------------------------------------------------------------- the steps


async def upload_file(lc: Lifecycle, run: JobRun) -> None:
    """pending -> dataset_ready: the training file (and the validation file, if the job
    has one) on the endpoint, each once per content, provider and endpoint."""
    assert run.spec.dataset_path is not None and run.report is not None
    if not await _ensure_file(lc, run, run.spec.dataset_path, run.report, "dataset_id"):
        return
    if run.spec.validation_path is not None:
        assert run.validation is not None
        path, report = run.spec.validation_path, run.validation
        if not await _ensure_file(lc, run, path, report, "validation_file_id"):
            return
    await lc.transition(run, State.DATASET_READY, intent=CREATE_FINETUNE)


async def _ensure_file(
    lc: Lifecycle, run: JobRun, path: Path, report: DatasetReport, field: str
) -> bool:
    """The file of ``path`` on the endpoint, its id in the record's ``field`` (and
    shared with later jobs of the same content); False when the job failed instead."""
    if getattr(run.record, field):
        return True  # recorded before a restart
    jobs, name, size = _jobs(lc), file_name(report), report.size
    key = f"{jobs.identity}|files|{run.spec.provider}|sha256:{report.sha256}"
    async with lc.content_lock(key):
        # Named by its content: this content sent for another job is not sent again.
        shared = await lc.store.find_dataset(key)
        file_id = shared.dataset_id if shared else None
        if file_id is None:
            # Sent before with its answer lost, by this job (looked for far back) or by
            # another of the same content killed before it shared it (among the newest).
            maybe_sent = run.record.intent == UPLOAD_FILE and run.unsent_intent is None
            found = await jobs.find_file(name, size, route(run), pages=50 if maybe_sent else 1)
            file_id = found.id if found else None
        if file_id is None:
            if run.record.intent != UPLOAD_FILE:
                await lc.persist(run, intent=UPLOAD_FILE)
            small = size < lc.settings.upload.small_file_bytes
            async with lc.small_upload_slots if small else lc.upload_slots:
                if run.cancel_requested:
                    return False
                lc.fence(run)
                run.unsent_intent = None  # from here on, the file may be made
                if size > MAX_FILE_BYTES:
                    from orchestrator.upload_parts import upload_in_parts

                    file_id, sha256 = await upload_in_parts(lc, run, path, name)
                else:
                    file_id, sha256 = await _upload_whole(lc, run, path, name, size)
            if sha256 != report.sha256:
                await lc.transition(
                    run,
                    State.FAILED,
                    "dataset changed while uploading",
                    error=f"dataset changed while uploading: {path} no longer has the "
                    "content that was checked; run again to check and upload it anew",
                    abandoned_datasets=(*run.record.abandoned_datasets, file_id),
                    intent=None,
                )
                return False
        # Inside the lock: the next job of this content finds it shared.
        record = run.record.evolve(**{field: file_id})
        await lc.store.save(record, dataset=SharedDataset(key, file_id, ""))
        run.record = record
    return True


async def _upload_whole(
    lc: Lifecycle, run: JobRun, path: Path, name: str, size: int
) -> tuple[str, str]:
    """One ``POST /v1/files``; (the file's id, SHA-256 of the bytes sent)."""
    progress = lc.metrics.upload_progress(run.record.name, size)
    handle = await anyio.to_thread.run_sync(path.open, "rb")
    try:
        body = FileBody(handle, size, lc.settings.upload.block_size, progress)
        started = time.monotonic()
        file = await _jobs(lc).upload_file(name, size, aiter(body), route(run))
        lc.metrics.uploaded(size, time.monotonic() - started)
    finally:
        lc.metrics.upload_finished(run.record.name)
        await anyio.to_thread.run_sync(handle.close)
    run.log.info("uploaded", bytes=size, file_id=file.id)
    return file.id, body.sha256.hexdigest()


async def create_job(lc: Lifecycle, run: JobRun) -> None:
    """dataset_ready -> finetune_created (or wherever a job found by its tags is)."""
    record, jobs = run.record, _jobs(lc)
    # Look before acting, always: a create may have happened with its answer lost, in
    # a process that crashed, or under a state file since lost. One list call per job.
    found = await jobs.find_jobs(tags(record), route(run))
    if found:
        await _created(lc, run, found[0], "found by its tags")
        return
    if record.intent != CREATE_FINETUNE:
        await lc.persist(run, intent=CREATE_FINETUNE)
    lc.fence(run)
    run.unsent_intent = None  # from here on, the endpoint may have made it
    job = await jobs.create_job(_create_body(run), route(run))
    await _created(lc, run, job, None)


def _create_body(run: JobRun) -> dict[str, Any]:
    spec, record = run.spec, run.record
    body: dict[str, Any] = {
        "model": spec.model,
        "training_file": record.dataset_id,
        "metadata": {**(spec.metadata or {}), **tags(record)},
    }
    if record.validation_file_id:
        body["validation_file"] = record.validation_file_id
    if spec.suffix:
        body["suffix"] = spec.suffix
    if spec.seed is not None:
        body["seed"] = spec.seed
    hyper = dict(spec.hyperparameters)
    if "epochs" in hyper:  # the manifest's common name; this API's is n_epochs
        hyper.setdefault("n_epochs", hyper.pop("epochs"))
    if hyper:
        body["method"] = {"type": "supervised", "supervised": {"hyperparameters": hyper}}
    return body


async def _created(lc: Lifecycle, run: JobRun, job: FineTuningJob, detail: str | None) -> None:
    now = time.time()
    await lc.transition(
        run,
        State.FINETUNE_CREATED,
        detail,
        finetune_id=job.id,
        remote_status=job.status,
        intent=None,
        phase_started_at=now,
        phase_adopted=detail is not None,
        poll_attempt=0,
        next_poll_at=now + lc.settings.poll.initial,
    )


# What a status that is still in progress means for the job's state.
_IN_PROGRESS = {
    Phase.CREATED: State.VALIDATING,
    Phase.VALIDATING: State.VALIDATING,
    Phase.VALIDATED: State.TRAINING,
    Phase.TRAINING: State.TRAINING,
}


async def await_job(lc: Lifecycle, run: JobRun) -> None:
    """finetune_created | validating | training: follow the job to its end."""
    seen = await _poll(lc, run)
    if seen is None:
        return
    job = seen.finetune
    assert isinstance(job, FineTuningJob)
    await _note_events(lc, run)
    state = run.record.state
    target = _IN_PROGRESS.get(seen.phase) if seen.phase is not None else state
    if target is None:  # it ended
        if seen.phase is Phase.SUCCEEDED and state is State.TRAINING:
            await _phase_ended(lc, run)
        await _adopt(lc, run, seen, None)
    elif target is state or (state is State.TRAINING and target is State.VALIDATING):
        await _schedule_poll(lc, run, seen, hint=job.estimated_finish)
    else:
        if state is State.VALIDATING:
            await _phase_ended(lc, run)  # validation ended here: its length teaches
        now = time.time()
        fields = _status_fields(lc, run, seen)
        if target is State.TRAINING:
            fields["training_started_at"] = now
        await lc.transition(
            run,
            target,
            None,
            phase_started_at=now,
            phase_adopted=state is State.FINETUNE_CREATED and target is State.TRAINING,
            poll_attempt=0,
            next_poll_at=now + lc.settings.poll.initial,
            **fields,
        )


async def _note_events(lc: Lifecycle, run: JobRun) -> None:
    """The job's newest event, into its history and the live view, when it is new.
    Events are a courtesy: one that cannot be read is skipped."""
    assert run.record.finetune_id
    try:
        events = await _jobs(lc).job_events(run.record.finetune_id, route(run), limit=5)
    except (UnreadableAnswer, PermanentError) as exc:
        if isinstance(exc, AuthError):
            raise
        return
    except Exception:
        return
    latest = next((e.message for e in reversed(events) if e.message), None)
    if latest and lc.redact(latest) != run.record.last_event:
        message = lc.redact(latest)
        record = run.record.evolve(last_event=message)
        state = record.state  # an event is a history row that leaves the state as it is
        await lc.store.save(
            record, Transition(record.name, state, state, record.updated_at, f"event: {message}")
        )
        run.record = record


async def cancel(lc: Lifecycle, run: JobRun) -> None:
    """Any state -> cancelled; the job is cancelled at the endpoint if it exists (found
    by its tags when its create's answer was lost). One that ended before the cancel
    reached it ends as it ended."""
    record, jobs = run.record, _jobs(lc)
    if (
        record.finetune_id is None
        and record.intent == CREATE_FINETUNE
        and run.unsent_intent is None
    ):
        found = await jobs.find_jobs(tags(record), route(run))
        if found:
            await lc.persist(run, finetune_id=found[0].id)
    fields: dict[str, Any] = {}
    if run.record.finetune_id:
        lc.fence(run)
        try:
            job = await jobs.cancel_job(run.record.finetune_id, route(run))
            fields = {"remote_status": job.status}
        except PermanentError as exc:
            if isinstance(exc, AuthError | NotFoundError):
                raise
            seen = await _poll(lc, run)  # refused: most likely it has ended
            if seen is None or seen.phase not in (Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED):
                raise UnreadableAnswer(exc.endpoint, exc.message, exc.status) from None
            await _adopt(lc, run, seen, "ended before the cancel")
            return
    await lc.transition(
        run, State.CANCELLED, "cancel requested", intent=None, next_poll_at=None, **fields
    )


STEPS = {
    State.PENDING: upload_file,
    State.DATASET_READY: create_job,
    State.FINETUNE_CREATED: await_job,
    State.VALIDATING: await_job,
    State.TRAINING: await_job,
}
POLLING_STATES = frozenset({State.FINETUNE_CREATED, State.VALIDATING, State.TRAINING})
