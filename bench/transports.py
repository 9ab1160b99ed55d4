"""Gateway requests per CPU-second at 64 in flight: httpx on its own pool (httpcore),
httpx over aiohttp's pool (what the gateway client uses), and aiohttp alone."""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import aiohttp
import anyio
import httpx
from httpx_aiohttp import AiohttpTransport

from bench.harness import API_KEY, simulator

PATH = "/v1/finetune/bench-missing"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _httpx(url: str, requests: int, aiohttp_pool: bool) -> float:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    transport = AiohttpTransport(limits=limits) if aiohttp_pool else None
    async with httpx.AsyncClient(
        base_url=url, headers={"x-portkey-api-key": API_KEY}, limits=limits, transport=transport
    ) as client:
        slots = anyio.CapacityLimiter(64)

        async def one() -> None:
            async with slots:
                (await client.get(PATH)).json()

        started = _cpu()
        async with anyio.create_task_group() as tg:
            for _ in range(requests):
                tg.start_soon(one)
        return requests / (_cpu() - started)


async def _aiohttp(url: str, requests: int) -> float:
    async with aiohttp.ClientSession(url, headers={"x-portkey-api-key": API_KEY}) as session:
        slots = asyncio.Semaphore(64)

        async def one() -> None:
            async with slots, session.get(PATH) as response:
                await response.json()

        started = _cpu()
        await asyncio.gather(*(one() for _ in range(requests)))
        return requests / (_cpu() - started)


def run(requests: int = 3000) -> dict[str, Any]:
    with simulator() as sim:
        return {
            "httpx_httpcore_req_per_cpu_s": round(anyio.run(_httpx, sim.url, requests, False)),
            "httpx_aiohttp_req_per_cpu_s": round(anyio.run(_httpx, sim.url, requests, True)),
            "aiohttp_req_per_cpu_s": round(asyncio.run(_aiohttp(sim.url, requests))),
        }
