"""Every client method against the simulator over a real socket, and each error class."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import anyio
import pytest
import yarl

from orchestrator.errors import (
    AuthError,
    ConflictError,
    NotFoundError,
    PermanentError,
    RetryableError,
    UnreadableAnswer,
)
from orchestrator.gateway import GatewayClient
from orchestrator.retry import RetryPolicy
from orchestrator.settings import ClientSettings
from orchestrator.simulator import SimulatorThread
from orchestrator.upload import s3_key_from_url
from tests.conftest import write_dataset

pytestmark = pytest.mark.anyio

FAST_RETRY = ClientSettings(retry=RetryPolicy(initial=0.01, maximum=0.05, max_attempts=8))


ClientFactory = Callable[..., GatewayClient]


@pytest.fixture
def client_for() -> ClientFactory:
    """A gateway client for the simulator (or any URL), with fast retries."""

    def make(
        sim: SimulatorThread | str,
        key: str | None = None,
        settings: ClientSettings = FAST_RETRY,
    ) -> GatewayClient:
        url = sim if isinstance(sim, str) else sim.url
        key = key or ("" if isinstance(sim, str) else sim.simulator.config.api_key)
        return GatewayClient(url, key, settings)

    return make


async def upload(url: str, path: Path) -> None:
    body = await anyio.Path(path).read_bytes()
    async with (
        aiohttp.ClientSession() as http,
        http.put(yarl.URL(url, encoded=True), data=body) as response,
    ):
        assert response.status == 200, await response.text()


async def wait_status(client: GatewayClient, finetune_id: str, wanted: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (await client.get_finetune(finetune_id)).status == wanted:
            return
        await _sleep(0.05)
    raise AssertionError(f"{finetune_id} never reached {wanted}")


async def _sleep(seconds: float) -> None:
    import anyio

    await anyio.sleep(seconds)


async def test_every_documented_call_in_order(
    client_for: ClientFactory, sim: SimulatorThread, tmp_path: Path
) -> None:
    data = write_dataset(tmp_path / "train set.jsonl")
    async with client_for(sim) as client:
        created = await client.create_dataset("train set.jsonl", "openai", "gpt-4o-mini")
        assert created.id.startswith("ds_") and created.signed_url.startswith(sim.url)
        await upload(created.signed_url, data)
        key = s3_key_from_url(created.signed_url)
        assert key == f"datasets/{created.id}/train set.jsonl"
        await client.update_dataset(created.id, key)
        dataset = await client.get_dataset(created.id)
        assert dataset.s3_path == key and dataset.name == "train set.jsonl"

        finetune = await client.create_finetune(
            "job-a", "vk-1", "bedrock", "amazon.titan-text-lite-v1", {"epochs": 2}
        )
        await client.update_finetune(finetune.id, created.id)
        await client.start_validation(finetune.id)
        await wait_status(client, finetune.id, "pk_dataset_validation_successfull")
        await client.start_finetune(finetune.id, override_model="amazon.titan-text-lite-v1:0:4k")
        await wait_status(client, finetune.id, "provider_finetune_succeeded")
        fetched = await client.get_finetune(finetune.id)
    # camelCase from the wire, snake_case on the model; unknown fields are kept.
    assert fetched.training_dataset_id == created.id
    assert fetched.hyperparameters == {"epochs": 2}
    assert fetched.slug and fetched.slug.startswith("ft:amazon.titan-text-lite-v1:0:4k:job-a")
    assert fetched.training_dataset is not None and fetched.training_dataset.s3_path == key
    assert fetched.model_extra and fetched.model_extra["aiModelType"] == "chat"
    journal = sim.journal
    assert journal.starts[finetune.id] == 1
    assert journal.requests["update_finetune"] == 1


async def test_cancel_and_conflicts(
    client_for: ClientFactory, sim: SimulatorThread, tmp_path: Path
) -> None:
    async with client_for(sim) as client:
        finetune = await client.create_finetune("job-b", "vk", "openai", "gpt-4o-mini", {})
        with pytest.raises(ConflictError) as no_dataset:
            await client.start_validation(finetune.id)
        assert no_dataset.value.status == 409 and "no training dataset" in no_dataset.value.message
        with pytest.raises(ConflictError):
            await client.start_finetune(finetune.id)
        await client.cancel_finetune(finetune.id)
        assert (await client.get_finetune(finetune.id)).status == "provider_finetune_cancelled"
        with pytest.raises(ConflictError) as twice:
            await client.cancel_finetune(finetune.id)
        assert twice.value.endpoint == "cancel_finetune"


async def test_a_404_for_an_id_is_no_statement_and_a_400_is_a_refusal(
    client_for: ClientFactory, sim: SimulatorThread
) -> None:
    """A 404 for an id the gateway gave us may be a stray answer (a replica behind, a
    proxy): retried, and for a job observed again, never taken as "gone"."""
    async with client_for(sim) as client:
        with pytest.raises(UnreadableAnswer) as missing:
            await client.get_finetune("ft_missing")
        assert missing.value.status == 404 and "ft_missing" in missing.value.message
        assert sim.journal.requests["get_finetune"] == FAST_RETRY.retry.max_attempts
        # An id that needs quoting goes out as one path segment, never as a path.
        with pytest.raises(UnreadableAnswer) as odd:
            await client.get_finetune("ft x/../y")
        assert "ft x/../y" in odd.value.message
        with pytest.raises(UnreadableAnswer):
            await client.get_dataset("ds_missing")
        finetune = await client.create_finetune("job-c", "vk", "openai", "gpt-4o-mini", {})
        with pytest.raises(PermanentError) as bad:
            await client.update_finetune(finetune.id, "ds_nope")
        assert bad.value.status == 400 and not isinstance(bad.value, RetryableError)


async def test_wrong_key_is_an_auth_error_without_the_key(
    client_for: ClientFactory, sim: SimulatorThread
) -> None:
    async with client_for(sim, key="wrong-key-123456") as client:
        with pytest.raises(AuthError) as refused:
            await client.create_dataset("a.jsonl", "openai", "gpt-4o-mini")
    assert refused.value.status == 401
    assert "wrong-key-123456" not in str(refused.value)
    assert sim.journal.requests["create_dataset"] == 0


async def test_refused_connection_is_retryable_and_names_the_gateway(
    client_for: ClientFactory,
) -> None:
    settings = ClientSettings(retry=RetryPolicy(initial=0.01, maximum=0.02, max_attempts=2))
    async with client_for("http://127.0.0.1:9", "secret-key-abc", settings) as client:
        with pytest.raises(RetryableError) as failed:
            await client.get_finetune("ft_x")
    assert failed.value.status is None
    assert "http://127.0.0.1:9" in str(failed.value) and "secret-key-abc" not in str(failed.value)


async def test_retry_after_is_honoured(client_for: ClientFactory, sim: SimulatorThread) -> None:
    sim.simulator.config.update({"rate_limit_rate": 1.0, "retry_after": 0.3})
    settings = ClientSettings(retry=RetryPolicy(initial=0.001, maximum=0.001, max_attempts=2))
    async with client_for(sim, settings=settings) as client:
        started = time.monotonic()
        with pytest.raises(RetryableError) as limited:
            await client.get_dataset("ds_x")
        waited = time.monotonic() - started
    assert limited.value.status == 429 and limited.value.retry_after == pytest.approx(0.3)
    # Two attempts, and the wait between them was the server's 0.3 s, not our 1 ms.
    assert sim.journal.faults["429"] == 2
    assert waited >= 0.3


async def test_retries_ride_out_injected_faults(
    client_for: ClientFactory, sim: SimulatorThread
) -> None:
    sim.simulator.config.update(
        {"error_rate": 0.3, "rate_limit_rate": 0.1, "retry_after": 0.01, "drop_rate": 0.1}
    )
    async with client_for(sim) as client:
        finetune = await client.create_finetune(
            "job-d", "vk", "openai", "gpt-4o-mini", {}, idempotency_key="key-d"
        )
        for _ in range(30):
            assert (await client.get_finetune(finetune.id)).id == finetune.id
    faults = sim.journal.faults
    assert faults["dropped"] > 0 and faults["429"] > 0
    assert sum(faults[s] for s in ("500", "502", "503")) > 0
    assert sim.journal.finetune_creates["job-d"] == 1


async def test_start_is_not_retried_blindly(
    client_for: ClientFactory, sim: SimulatorThread
) -> None:
    async with client_for(sim) as client:
        finetune = await client.create_finetune("job-e", "vk", "openai", "gpt-4o-mini", {})
        sim.simulator.config.update({"error_rate": 1.0})
        with pytest.raises(RetryableError):
            await client.start_finetune(finetune.id)
    # One attempt only: whether to try again is the lifecycle's decision, after observing.
    assert sum(sim.journal.faults.values()) == 1


async def test_idempotency_key_returns_the_same_object(
    client_for: ClientFactory, sim: SimulatorThread
) -> None:
    async with client_for(sim) as client:
        first = await client.create_dataset("a.jsonl", "openai", "m", idempotency_key="same")
        second = await client.create_dataset("a.jsonl", "openai", "m", idempotency_key="same")
        other = await client.create_dataset("a.jsonl", "openai", "m", idempotency_key="other")
        ft1 = await client.create_finetune("f", "vk", "openai", "m", {}, idempotency_key="k")
        ft2 = await client.create_finetune("f", "vk", "openai", "m", {}, idempotency_key="k")
    assert first.id == second.id != other.id
    assert ft1.id == ft2.id
    assert sim.journal.dataset_creates["a.jsonl"] == 2
    assert sim.journal.finetune_creates["f"] == 1


async def test_lost_response_on_create_is_recovered_by_the_key(
    client_for: ClientFactory, sim: SimulatorThread
) -> None:
    sim.simulator.config.update({"lost_response_rate": 0.3})
    async with client_for(sim) as client:
        ids = {
            (
                await client.create_finetune(
                    f"lost-{i}", "vk", "o", "m", {}, idempotency_key=f"lost-{i}"
                )
            ).id
            for i in range(20)
        }
    assert len(ids) == 20
    assert sim.journal.faults["lost_response"] > 0
    assert all(sim.journal.finetune_creates[f"lost-{i}"] == 1 for i in range(20))


async def test_requests_per_second_cap(client_for: ClientFactory, sim: SimulatorThread) -> None:
    settings = ClientSettings(requests_per_second=20, retry=RetryPolicy(max_attempts=1))
    async with client_for(sim, settings=settings) as client:
        started = time.monotonic()
        for _ in range(11):
            with contextlib.suppress(UnreadableAnswer):
                await client.get_dataset("ds_none")
        elapsed = time.monotonic() - started
    # Eleven requests at 20/s are spaced over at least half a second.
    assert elapsed >= 0.45


async def test_server_errors_without_json_are_reported(
    client_for: ClientFactory, sim: SimulatorThread
) -> None:
    async with client_for(sim) as client:
        with pytest.raises(NotFoundError) as unknown:
            await client._call(  # an undocumented path answers 404 with the envelope
                __import__("orchestrator.gateway", fromlist=["x"]).Endpoint(
                    "bogus", "GET", "/v1/nothing-here", True
                )
            )
    assert "no route" in unknown.value.message


async def test_success_false_with_200_is_no_statement_and_keeps_the_message(
    client_for: ClientFactory,
) -> None:
    """A gateway may answer 200 with success: false. The status says it worked, the body
    says it did not: nothing can be concluded, so the call is unreadable (retried, and
    for a poll, observed again), and the gateway's message is kept."""
    from aiohttp import web

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"success": False, "error": {"message": "quota exceeded"}})

    app = web.Application()
    app.router.add_get("/v1/finetune/{id}", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with client_for(f"http://127.0.0.1:{port}", "key-123456") as client:
            with pytest.raises(UnreadableAnswer) as refused:
                await client.get_finetune("ft_1")
    finally:
        await runner.cleanup()
    assert refused.value.status == 200 and "quota exceeded" in refused.value.message
    assert isinstance(refused.value, RetryableError)
