"""Wiring shared by ``run`` and the daemon: a manifest's clients, lifecycle and engine."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from orchestrator.engine import Engine
from orchestrator.errors import AuthError, GatewayError, InputError, RetryableError
from orchestrator.gateway import GatewayClient
from orchestrator.lifecycle import Lifecycle
from orchestrator.manifest import Manifest
from orchestrator.metrics import Metrics
from orchestrator.settings import EngineSettings
from orchestrator.store import CheckpointStore
from orchestrator.upload import storage_client


def gateway_of(manifest: Manifest) -> tuple[str, str]:
    """The base URL and API key a manifest runs against, or a clear InputError."""
    if not manifest.base_url:
        raise InputError(
            f"{manifest.path}: no gateway: set gateway.base_url in the manifest or PORTKEY_BASE_URL"
        )
    if not manifest.api_key:
        raise InputError(
            f"{manifest.path}: no API key: set gateway.api_key in the manifest or PORTKEY_API_KEY"
        )
    return manifest.base_url, manifest.api_key


async def check_gateway(client: GatewayClient) -> None:
    """One cheap call before any work: a wrong URL or key is bad input, not 300 failed jobs."""
    try:
        await client.probe()
    except AuthError as exc:
        raise InputError(
            f"gateway {client.base_url} refused the API key (HTTP {exc.status})"
        ) from None
    except RetryableError as exc:
        detail = exc.message.removeprefix(f"gateway {client.base_url}: ")
        raise InputError(f"cannot reach gateway {client.base_url}: {detail}") from None
    except GatewayError as exc:
        raise InputError(f"gateway {client.base_url}: {exc.message}") from None


async def preflight(manifest: Manifest, settings: EngineSettings) -> None:
    """``check_gateway`` with a client of its own, before anything is opened or stored."""
    base_url, api_key = gateway_of(manifest)
    async with GatewayClient(base_url, api_key, settings.client) as client:
        await check_gateway(client)


@asynccontextmanager
async def open_engine(
    manifest: Manifest,
    store: CheckpointStore,
    settings: EngineSettings,
    metrics: Metrics,
    *,
    until: str = "done",
    preflight: bool = True,
    seed: int | None = None,
) -> AsyncIterator[Engine]:
    base_url, api_key = gateway_of(manifest)
    rng = random.Random(seed)
    async with (
        GatewayClient(base_url, api_key, settings.client, observer=metrics, rng=rng) as client,
        storage_client(settings.upload, settings.client.http_client) as storage,
    ):
        if preflight:
            await check_gateway(client)
        lc = Lifecycle(
            client=client,
            storage=storage,
            store=store,
            statuses=manifest.statuses,
            settings=settings,
            metrics=metrics,
            upload_slots=anyio.Semaphore(settings.upload.concurrency, fast_acquire=True),
            small_upload_slots=anyio.Semaphore(
                settings.upload.small_concurrency, fast_acquire=True
            ),
            rng=rng,
        )
        yield Engine(lc, until=until)
