"""Gateway requests per CPU-second at 64 in flight, through `GatewayClient` and through
aiohttp alone (the floor: no envelope checks, no models, no retries, no state, no logs).
Their ratio is what the client's own layers cost; ``bare_aiohttp_cpu_per_request`` is
also the yardstick the lifecycle benchmark divides the orchestrator's CPU by."""

from __future__ import annotations

import asyncio
import importlib.util
import resource
from typing import Any

import aiohttp
import anyio

from bench.harness import API_KEY, simulator
from orchestrator.gateway import GatewayClient
from orchestrator.settings import ClientSettings

IN_FLIGHT = 64
UVLOOP = {"use_uvloop": importlib.util.find_spec("uvloop") is not None}  # as the CLI runs


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _gateway_client(url: str, requests: int) -> float:
    settings = ClientSettings(max_connections=IN_FLIGHT)
    async with GatewayClient(url, API_KEY, settings) as client:
        finetune = await client.create_finetune("bench", "vk", "openai", "gpt-4o-mini", {})
        slots = anyio.Semaphore(IN_FLIGHT)

        async def one() -> None:
            async with slots:
                await client.get_finetune(finetune.id)

        started = _cpu()
        async with anyio.create_task_group() as tg:
            for _ in range(requests):
                tg.start_soon(one)
        return requests / (_cpu() - started)


async def _aiohttp(url: str, requests: int) -> float:
    async with aiohttp.ClientSession(url, headers={"x-portkey-api-key": API_KEY}) as session:
        async with session.post(
            "/v1/finetune",
            json={"name": "b", "virtual_key": "vk", "provider": "openai", "model": "m"},
        ) as created:
            path = f"/v1/finetune/{(await created.json())['data']['id']}"
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def one() -> None:
            async with slots, session.get(path) as response:
                await response.json()

        started = _cpu()
        await asyncio.gather(*(one() for _ in range(requests)))
        return requests / (_cpu() - started)


def bare_aiohttp_cpu_per_request(url: str, requests: int = 3000) -> float:
    """CPU seconds per status GET of aiohttp alone against the simulator at ``url``."""
    return 1.0 / anyio.run(_aiohttp, url, requests, backend_options=UVLOOP)


def run(requests: int = 3000) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with simulator() as sim:
        client = anyio.run(_gateway_client, sim.url, requests, backend_options=UVLOOP)
        bare = anyio.run(_aiohttp, sim.url, requests, backend_options=UVLOOP)
    results["gateway_client_req_per_cpu_s"] = round(client)
    results["aiohttp_alone_req_per_cpu_s"] = round(bare)
    results["gateway_client_cpu_vs_aiohttp"] = round(bare / client, 2)
    return results
