"""When ``start_training`` looks before it sends ``/start``: only when the intent on
record may already have been acted on (an earlier attempt or process), never right
after this process persisted it with the ``validated`` transition."""

from __future__ import annotations

from typing import Any, cast

import anyio
import pytest

from orchestrator.errors import RetryableError
from orchestrator.gateway import Finetune, GatewayClient
from orchestrator.lifecycle import START_FINETUNE, JobRun, Lifecycle, start_training
from orchestrator.manifest import JobSpec
from orchestrator.metrics import Metrics
from orchestrator.sessions import HttpSession
from orchestrator.settings import EngineSettings
from orchestrator.states import JobRecord, State
from orchestrator.statuses import default_status_map
from orchestrator.store import MemoryStore

pytestmark = pytest.mark.anyio


class RecordingGateway:
    """The two calls ``start_training`` makes, recorded in order; the remote status is
    whatever the test says, and ``/start`` can lose its response after taking effect."""

    base_url = identity = "http://gateway.test"

    def __init__(self, status: str, lose_start_response: bool = False) -> None:
        self.status = status
        self.lose_start_response = lose_start_response
        self.calls: list[str] = []

    async def get_finetune(self, finetune_id: str) -> Finetune:
        self.calls.append("get")
        return Finetune(id=finetune_id, status=self.status)

    async def start_finetune(self, finetune_id: str, override_model: str | None = None) -> None:
        self.calls.append("start")
        self.status = "provider_finetune_in_progress"
        if self.lose_start_response:
            raise RetryableError("start_finetune", "response lost")


def job(gateway: RecordingGateway, record: JobRecord) -> tuple[Lifecycle, JobRun]:
    lc = Lifecycle(
        client=cast(GatewayClient, gateway),
        storage=cast(HttpSession, None),
        store=MemoryStore(),
        statuses=default_status_map(),
        settings=EngineSettings(),
        metrics=Metrics(),
        upload_slots=anyio.Semaphore(1),
        small_upload_slots=anyio.Semaphore(1),
    )
    spec = JobSpec("a", "openai", "m", "vk", {}, None, None, "k")
    return lc, JobRun(spec, record)


def record(**changes: Any) -> JobRecord:
    return JobRecord(name="a", fingerprint="f", finetune_id="ft_1", **changes)


async def test_the_validated_transition_carries_the_intent_and_start_goes_straight_out() -> None:
    gateway = RecordingGateway("pk_dataset_validation_successfull")
    lc, run = job(gateway, record(state=State.VALIDATING))
    saves = len(cast(MemoryStore, lc.store).transitions)
    await lc.transition(run, State.VALIDATED, intent=START_FINETUNE)
    assert run.record.intent == START_FINETUNE  # durable before /start, in the same save
    await start_training(lc, run)
    assert gateway.calls == ["start"]
    assert run.record.state is State.TRAINING and run.record.intent is None
    assert len(cast(MemoryStore, lc.store).transitions) == saves + 2  # no save of its own


@pytest.mark.parametrize(
    ("status", "calls", "detail"),
    [
        ("pk_dataset_validation_successfull", ["get", "start"], None),
        ("provider_finetune_in_progress", ["get"], "start observed on the gateway"),
    ],
)
async def test_an_intent_from_an_earlier_process_is_resolved_by_looking_first(
    status: str, calls: list[str], detail: str | None
) -> None:
    gateway = RecordingGateway(status)
    lc, run = job(gateway, record(state=State.VALIDATED, intent=START_FINETUNE))
    await start_training(lc, run)
    assert gateway.calls == calls
    assert run.record.state is State.TRAINING
    assert cast(MemoryStore, lc.store).transitions[-1].detail == detail


async def test_a_lost_start_response_is_looked_at_and_never_sent_again() -> None:
    gateway = RecordingGateway("pk_dataset_validation_successfull", lose_start_response=True)
    lc, run = job(gateway, record(state=State.VALIDATING))
    await lc.transition(run, State.VALIDATED, intent=START_FINETUNE)
    await start_training(lc, run)
    assert gateway.calls == ["start", "get"]
    assert run.record.state is State.TRAINING
    assert run.unsent_intent is None  # a later attempt in this process looks first too
