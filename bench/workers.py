"""Several workers on one PostgreSQL database: the makespan of 3,000 jobs with one worker
against three on the same database and simulator, and gateway requests per job (the
sharing must not cost calls: one driver per job, whoever it is)."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg

from bench.harness import Measured, cli, measure, orchestrator_env, simulator
from bench.lifecycle import _manifest
from bench.pg_drivers import URL

FLAGS = ["--latency", "0.02", "--validation-seconds", "5", "--training-seconds", "10"]


def _drop(schema: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(go())


def _run(manifest: Path, workers: int) -> tuple[float, float, int]:
    """(makespan, CPU of all workers, gateway requests) of ``workers`` workers."""
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    state = f"{URL}?schema={schema}"
    try:
        with simulator(*FLAGS) as sim:
            env = orchestrator_env(sim)
            args = cli("run", str(manifest), "--state", state, "--no-live", "--lease-ttl", "10")
            with ThreadPoolExecutor(workers) as pool:
                done: list[Measured] = list(pool.map(lambda _: measure(args, env), range(workers)))
            journal = sim.journal()
        for measured in done:
            assert measured.code == 0, measured.stderr[-3000:]
        requests = sum(journal["requests"].values()) + sum(journal["faults"].values())
        return max(m.wall for m in done), sum(m.cpu for m in done), requests
    finally:
        _drop(schema)


def run(jobs: int = 3000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        manifest = _manifest(Path(tmp), jobs, prefix="w")
        one_wall, one_cpu, one_requests = _run(manifest, 1)
        three_wall, three_cpu, three_requests = _run(manifest, 3)
    return {
        f"pg_makespan_{jobs}_jobs_1_worker_s": round(one_wall, 2),
        f"pg_makespan_{jobs}_jobs_3_workers_s": round(three_wall, 2),
        "pg_3_workers_vs_1_makespan": round(three_wall / one_wall, 2),
        "pg_requests_per_job_1_worker": round(one_requests / jobs, 2),
        "pg_requests_per_job_3_workers": round(three_requests / jobs, 2),
        "pg_cpu_ms_per_job_1_worker": round(1000 * one_cpu / jobs, 2),
        "pg_cpu_ms_per_job_3_workers": round(1000 * three_cpu / jobs, 2),
        "pg_machine_cpus": os.cpu_count(),
    }
