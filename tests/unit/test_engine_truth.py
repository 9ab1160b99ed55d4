"""The gateway is the truth: the engine and lifecycle on a scripted gateway and the
memory store. What could not be read is never a verdict; one driver owns each job; a
failed phase teaches the poll clock nothing."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import anyio
import anyio.lowlevel
import pytest

from orchestrator.datasets import DatasetReport
from orchestrator.engine import Engine
from orchestrator.errors import (
    ConflictError,
    NotFoundError,
    RetryableError,
    UnreadableAnswer,
)
from orchestrator.gateway import CreatedDataset, CreatedFinetune, Dataset, Finetune, GatewayClient
from orchestrator.lifecycle import START_FINETUNE, JobRun, Lifecycle, poll_due
from orchestrator.manifest import JobSpec
from orchestrator.metrics import Metrics
from orchestrator.plan import Action, PlannedJob
from orchestrator.retry import RetryPolicy
from orchestrator.sessions import HttpSession
from orchestrator.settings import EngineSettings, PollSettings
from orchestrator.states import JobRecord, State
from orchestrator.statuses import default_status_map
from orchestrator.store import MemoryStore

pytestmark = pytest.mark.anyio

VALIDATED = "pk_dataset_validation_successfull"
TRAINING = "provider_finetune_in_progress"


class ScriptedGateway:
    """The gateway calls the steps make, recorded in order. ``answers`` are what the
    next GETs of the finetune return (a status, or an exception to raise); after them,
    ``status``. A status string that names no phase is just a string."""

    base_url = identity = "http://gateway.test"

    def __init__(self, status: str = "pk_finetune_created", slug: str | None = None) -> None:
        self.status = status
        self.slug = slug
        self.error: Any = None
        self.answers: list[str | Exception] = []
        self.cancel_errors: list[Exception] = []
        self.cancel_seconds = 0.0  # how long a cancel takes
        self.calls: list[str] = []

    async def create_dataset(self, *args: Any, **kwargs: Any) -> CreatedDataset:
        self.calls.append("create_dataset")
        return CreatedDataset(id="ds_1", signed_url="http://s3.test/b/k?sig=1")

    async def get_dataset(self, dataset_id: str) -> Dataset:
        self.calls.append("get_dataset")
        return Dataset(id=dataset_id)

    async def update_dataset(self, dataset_id: str, s3_path: str) -> None:
        self.calls.append("update_dataset")

    async def create_finetune(self, *args: Any, **kwargs: Any) -> CreatedFinetune:
        self.calls.append("create_finetune")
        return CreatedFinetune(id="ft_1")

    async def update_finetune(self, finetune_id: str, dataset_id: str) -> None:
        self.calls.append("attach")
        self.status = "pk_dataset_attached"

    async def start_validation(self, finetune_id: str) -> None:
        self.calls.append("start_validation")
        self.status = "pk_dataset_validation_started"

    async def get_finetune(self, finetune_id: str) -> Finetune:
        self.calls.append("get")
        answer = self.answers.pop(0) if self.answers else self.status
        if isinstance(answer, Exception):
            raise answer
        return Finetune(
            id=finetune_id,
            status=answer,
            slug=self.slug,
            error=self.error,
            training_dataset_id="ds_1" if answer != "pk_finetune_created" else None,
        )

    async def start_finetune(self, finetune_id: str, override_model: str | None = None) -> None:
        self.calls.append("start")
        self.status = TRAINING

    async def cancel_finetune(self, finetune_id: str) -> None:
        self.calls.append("cancel")
        await anyio.sleep(self.cancel_seconds)
        if self.cancel_errors:
            raise self.cancel_errors.pop(0)
        self.status = "provider_finetune_cancelled"


FAST = RetryPolicy(initial=0.01, coefficient=1.0, maximum=0.01, jitter=False)


def lifecycle(gateway: ScriptedGateway, store: MemoryStore | None = None) -> Lifecycle:
    settings = replace(
        EngineSettings(cancel_check_interval=0.01),
        poll=PollSettings(initial=0.01, maximum=0.02),
    )
    settings = replace(settings, client=replace(settings.client, retry=FAST))
    return Lifecycle(
        client=cast(GatewayClient, gateway),
        storage=cast(HttpSession, None),
        store=store or MemoryStore(),
        statuses=default_status_map(),
        settings=settings,
        metrics=Metrics(),
        upload_slots=anyio.Semaphore(1),
        small_upload_slots=anyio.Semaphore(1),
    )


SPEC = JobSpec("a", "openai", "m", "vk", {}, None, None, "data/a.jsonl")


def record(state: State, **changes: Any) -> JobRecord:
    return JobRecord(
        name="a", fingerprint="f", state=state, dataset_id="ds_1", finetune_id="ft_1", **changes
    )


async def drive(
    lc: Lifecycle, *plans: PlannedJob, until: str = "done", timeout: float = 10
) -> Engine:
    """Run a batch of ``plans`` to its end on a fast engine."""
    engine = Engine(lc, step_retry=FAST, until=until)
    with anyio.fail_after(timeout):
        await engine.run_batch(plans)
    return engine


def resume(rec: JobRecord, spec: JobSpec = SPEC) -> PlannedJob:
    return PlannedJob(spec, Action.RESUME, rec.fingerprint, rec, None)


async def test_unreadable_answers_and_unknown_statuses_never_end_a_training() -> None:
    gateway = ScriptedGateway(slug="ft:m:a-1")
    gateway.answers = [
        UnreadableAnswer("get_finetune", "not a JSON envelope: <html>", 200),
        NotFoundError("get_finetune", "finetune ft_1 not found", 404),
        RetryableError("get_finetune", "bad gateway", 502),
        "provider_finetune_mystery",
        TRAINING,
        "provider_finetune_successfull",
    ]
    lc = lifecycle(gateway)
    now = time.time()
    engine = await drive(lc, resume(record(State.TRAINING, phase_started_at=now, next_poll_at=now)))
    run = engine.runs["a"]
    assert run.record.state is State.SUCCEEDED
    assert run.record.fine_tuned_model == "ft:m:a-1"
    assert run.record.unknown_status_since is None
    counts = lc.metrics.counts.values
    assert [v for k, v in counts.items() if k.name.endswith("unreadable_polls")] == [{(): 3.0}]
    assert gateway.calls == ["get"] * 6


async def test_a_training_ends_on_its_deadline_and_a_retry_may_adopt_it() -> None:
    gateway = ScriptedGateway()
    gateway.answers = [UnreadableAnswer("get_finetune", "truncated")] * 3
    gateway.status = TRAINING
    lc = lifecycle(gateway)
    lc.settings = replace(lc.settings, poll=replace(lc.settings.poll, training_deadline=0.05))
    engine = await drive(lc, resume(record(State.TRAINING, phase_started_at=time.time())))
    failed = engine.runs["a"].record
    assert failed.state is State.FAILED and "did not finish within" in (failed.error or "")
    assert failed.adoptable  # the gateway never said it failed


async def test_an_unknown_status_while_resolving_start_is_looked_at_again() -> None:
    gateway = ScriptedGateway(status=VALIDATED)
    gateway.answers = [
        "provider_finetune_mystery",
        UnreadableAnswer("get_finetune", "answer has no status"),
        VALIDATED,
    ]
    lc = lifecycle(gateway)
    engine = await drive(
        lc, resume(record(State.VALIDATED, intent=START_FINETUNE)), until="submitted"
    )
    # /start only after the gateway said validated again, and only once.
    assert gateway.calls == ["get", "get", "get", "start"]
    assert engine.runs["a"].record.state is State.TRAINING


async def test_a_finetune_found_further_along_is_adopted_not_reattached() -> None:
    gateway = ScriptedGateway(status="provider_finetune_successfull", slug="ft:m:a-9")
    lc = lifecycle(gateway)
    engine = await drive(lc, resume(record(State.FINETUNE_CREATED)))
    assert engine.runs["a"].record.state is State.SUCCEEDED
    assert engine.runs["a"].record.fine_tuned_model == "ft:m:a-9"
    assert gateway.calls == ["get"]  # no attach (it would reset it), no start


async def test_an_error_object_reaches_the_job_with_its_code() -> None:
    gateway = ScriptedGateway(status="pk_dataset_validation_failed")
    gateway.error = {"message": "line 3: missing messages", "code": "invalid_file"}
    lc = lifecycle(gateway)
    engine = await drive(lc, resume(record(State.VALIDATING, phase_started_at=time.time())))
    failed = engine.runs["a"].record
    assert failed.state is State.FAILED
    assert failed.error == "validation failed: line 3: missing messages (code invalid_file)"
    assert not failed.adoptable  # the gateway said so
    assert lc.metrics.recent_failures[-1] == ("a", failed.error)


async def test_only_a_successful_phase_teaches_the_poll_clock() -> None:
    store = MemoryStore()
    failing = ScriptedGateway(status="pk_dataset_validation_failed")
    lc = lifecycle(failing, store)
    started = time.time() - 3
    await drive(lc, resume(record(State.VALIDATING, phase_started_at=started)))
    assert lc.clock.estimates == {} and store.estimates == {}

    lc = lifecycle(ScriptedGateway(status=VALIDATED), store)
    await drive(lc, resume(record(State.VALIDATING, phase_started_at=started)), until="submitted")
    assert list(store.estimates) == ["validating|openai|m"]


def test_no_poll_is_due_sooner_than_the_poll_interval_after_the_last() -> None:
    lc = lifecycle(ScriptedGateway())
    now = time.time()
    run = JobRun(SPEC, record(State.TRAINING, phase_started_at=now - 10, next_poll_at=now))
    run.last_poll_at = now
    lc.clock.estimates["training|openai|m"] = 0.001  # a tiny estimate says "poll now"
    due = poll_due(lc, run)
    assert due is not None and due >= now + lc.settings.poll.initial


async def test_a_cancel_for_a_job_admitted_but_not_yet_driven_is_made_once() -> None:
    gateway = ScriptedGateway(status=TRAINING)
    store = MemoryStore()
    lc = lifecycle(gateway, store)
    engine = Engine(lc, step_retry=FAST)
    now = time.time()
    plan = resume(record(State.TRAINING, phase_started_at=now, next_poll_at=now + 60))
    await store.request_cancel(["a"])
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.serve)
            async with anyio.create_task_group() as jobs:
                runs = await engine.admit([plan], summary := _summary())
                await engine.start(jobs, runs)
                await engine._take_cancels()  # before the driver's task has run at all
            tg.cancel_scope.cancel()
    assert summary.states == {}
    assert engine.runs["a"].record.state is State.CANCELLED
    assert gateway.calls.count("cancel") == 1
    assert store.cancels == set()


async def test_a_job_left_alone_is_cancelled_by_a_driver_of_its_own() -> None:
    gateway = ScriptedGateway(status=TRAINING)
    store = MemoryStore()
    lc = lifecycle(gateway, store)
    engine = Engine(lc, step_retry=FAST)
    old = record(State.TRAINING)
    plan = PlannedJob(SPEC, Action.CHANGED, "f2", old, None)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.serve)
            await engine.admit([plan], _summary())
            await store.request_cancel(["a"])
            await engine._take_cancels()  # hands it to a driver of its own
            await engine.wait_idle()
            tg.cancel_scope.cancel()
    assert engine.runs["a"].record.state is State.CANCELLED
    assert gateway.calls == ["cancel"]


async def test_a_cancel_that_fails_is_retried_and_no_step_runs_after_it() -> None:
    gateway = ScriptedGateway(status=VALIDATED)
    gateway.cancel_errors = [
        RetryableError("cancel_finetune", "bad gateway", 502),
        UnreadableAnswer("cancel_finetune", "cut short", 200),
    ]
    store = MemoryStore()
    lc = lifecycle(gateway, store)
    await store.request_cancel(["a"])
    engine = Engine(lc, step_retry=FAST)
    with anyio.fail_after(10):
        await engine.run_batch([resume(record(State.VALIDATED, intent=START_FINETUNE))])
    assert engine.runs["a"].record.state is State.CANCELLED
    assert gateway.calls == ["cancel", "cancel", "cancel"]  # never /start


async def test_a_replace_in_flight_with_an_invalid_dataset_cancels_and_keeps_the_old_id() -> None:
    gateway = ScriptedGateway(status=TRAINING)
    store = MemoryStore()
    lc = lifecycle(gateway, store)
    old = record(State.TRAINING)
    bad = DatasetReport(Path("a.jsonl"), errors=["a.jsonl:3: not valid JSON"])
    engine = Engine(lc, step_retry=FAST)
    with anyio.fail_after(10):
        summary = await engine.run_batch([PlannedJob(SPEC, Action.INVALID, "f2", old, bad)])
    new = store.jobs["a"]
    assert gateway.calls == ["cancel"]
    assert new.state is State.FAILED and new.error == "a.jsonl:3: not valid JSON"
    assert new.abandoned_finetunes == ("ft_1",) and new.finetune_id is None
    assert summary.states == {"a": State.FAILED}
    assert summary.errors == {"a": "a.jsonl:3: not valid JSON"}


async def test_a_replace_whose_cancel_is_refused_leaves_the_job_as_it_was() -> None:
    gateway = ScriptedGateway(status=TRAINING)
    gateway.cancel_errors = [ConflictError("cancel_finetune", "busy", 409)]
    gateway.answers = [UnreadableAnswer("get_finetune", "cut short")]
    store = MemoryStore()
    store.jobs["a"] = old = record(State.TRAINING)
    lc = lifecycle(gateway, store)
    engine = Engine(lc, step_retry=FAST)
    with anyio.fail_after(10):
        summary = await engine.run_batch([PlannedJob(SPEC, Action.REPLACE, "f2", old, None)])
    assert store.jobs["a"] == old
    assert summary.changed == ["a"]


async def test_a_retry_of_a_failure_of_ours_replays_its_keys() -> None:
    store = MemoryStore()
    lc = lifecycle(ScriptedGateway(), store)
    ours = record(State.FAILED, attempt=3, adoptable=True)
    theirs = replace(ours, name="b", adoptable=False)
    engine = Engine(lc, step_retry=FAST)
    spec_b = replace(SPEC, name="b")
    with anyio.fail_after(10):
        await engine.admit(
            [
                PlannedJob(SPEC, Action.RETRY, "f", ours, None),
                PlannedJob(spec_b, Action.RETRY, "f", theirs, None),
            ],
            _summary(),
        )
    assert store.jobs["a"].attempt == 3 and store.jobs["a"].abandoned_finetunes == ()
    assert store.jobs["b"].attempt == 4 and store.jobs["b"].abandoned_finetunes == ("ft_1",)


def _summary() -> Any:
    from orchestrator.engine import RunSummary

    return RunSummary()


async def test_a_cancel_seen_between_admission_and_start_is_left_to_the_jobs_driver() -> None:
    gateway = ScriptedGateway(status=TRAINING)
    gateway.cancel_seconds = 0.2  # a second driver would cancel meanwhile
    store = MemoryStore()
    lc = lifecycle(gateway, store)
    engine = Engine(lc, step_retry=FAST)
    now = time.time()
    plans = [
        resume(
            replace(record(State.TRAINING, phase_started_at=now, next_poll_at=now + 60), name=n),
            replace(SPEC, name=n),
        )
        for n in (f"j{i:02d}" for i in range(70))
    ]
    store.jobs.update({plan.spec.name: plan.record for plan in plans if plan.record})
    await store.request_cancel(["j69"])
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.serve)
            await anyio.lowlevel.checkpoint()
            runs = await engine.admit(plans, _summary())
            await engine._take_cancels()  # j69 is admitted, its driver not started yet
            async with anyio.create_task_group() as jobs:
                await engine.start(jobs, runs)
                while engine.runs["j69"].record.state is not State.CANCELLED:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                engine.stop()
            tg.cancel_scope.cancel()
    assert gateway.calls.count("cancel") == 1
    assert [t.new for t in store.transitions if t.name == "j69"] == [State.CANCELLED]


async def test_no_start_goes_out_after_a_cancel_asked_while_it_waited_for_a_slot() -> None:
    gateway = ScriptedGateway(status=VALIDATED)
    store = MemoryStore()
    lc = lifecycle(gateway, store)
    lc.settings = replace(lc.settings, step_concurrency=1)
    engine = Engine(lc, step_retry=FAST, until="submitted")
    plan = resume(record(State.VALIDATED, intent=START_FINETUNE))
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.serve)
            async with engine.step_slots:  # another job's step holds the only slot
                runs = await engine.admit([plan], _summary())
                await engine.start(tg, runs)
                await anyio.sleep(0.05)  # the driver now waits for the slot
                await store.request_cancel(["a"])
                await engine._take_cancels()
            await engine.wait_idle()
            tg.cancel_scope.cancel()
    assert "start" not in gateway.calls
    assert engine.runs["a"].record.state is State.CANCELLED


async def test_a_cancel_after_a_create_whose_answer_was_lost_cancels_what_was_made() -> None:
    gateway = ScriptedGateway(status=TRAINING)
    store = MemoryStore()
    lc = lifecycle(gateway, store)
    lost = JobRecord(
        name="a",
        fingerprint="f",
        state=State.DATASET_READY,
        dataset_id="ds_1",
        intent="create_finetune",
    )
    await store.request_cancel(["a"])
    engine = await drive(lc, resume(lost))
    assert gateway.calls == ["create_finetune", "cancel"]  # replayed with the same key
    assert engine.runs["a"].record.state is State.CANCELLED
    assert engine.runs["a"].record.finetune_id == "ft_1"


async def test_a_cancel_refused_while_the_gateway_trains_is_tried_again() -> None:
    gateway = ScriptedGateway(status=TRAINING)
    gateway.cancel_errors = [
        ConflictError("cancel_finetune", "busy", 409),
        UnreadableAnswer("cancel_finetune", "finetune ft_1 not found (looked at again)", 404),
    ]
    store = MemoryStore()
    lc = lifecycle(gateway, store)
    await store.request_cancel(["a"])
    engine = await drive(lc, resume(record(State.TRAINING, phase_started_at=time.time())))
    assert gateway.calls == ["cancel", "get", "cancel", "cancel"]
    assert engine.runs["a"].record.state is State.CANCELLED
    assert [t.new for t in store.transitions] == [State.CANCELLED]  # never before it was


async def test_an_adopted_phase_teaches_nothing_even_after_a_restart() -> None:
    store = MemoryStore()
    gateway = ScriptedGateway(status="pk_dataset_validation_in_progress")
    lc = lifecycle(gateway, store)
    # Found validating on the gateway (a replay after a lost state file): adopted.
    gateway.answers = ["pk_dataset_validation_in_progress"]
    engine = Engine(lc, step_retry=FAST)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.serve)
            runs = await engine.admit([resume(record(State.FINETUNE_CREATED))], _summary())
            await engine.start(tg, runs)
            while engine.runs["a"].record.state is not State.VALIDATING:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            engine.stop()
            await engine.wait_idle()
            tg.cancel_scope.cancel()
    adopted = store.jobs["a"]
    assert adopted.state is State.VALIDATING and adopted.phase_adopted
    # Another process resumes it from the store and sees validation end.
    gateway.status = VALIDATED
    await drive(lifecycle(gateway, store), resume(adopted), until="submitted")
    assert store.estimates == {}
