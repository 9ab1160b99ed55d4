"""The two well-kept async PostgreSQL drivers side by side, on the store's own work.

Both run the same statements against the same server, one after the other, in one run:
point reads (a status page, a claim) and group commits (one statement upserting a batch
of job rows from a JSON array, as ``PostgresStore`` does). The figures are why the store
uses asyncpg; psycopg is a bench-only dependency, and without it the suite says so.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import anyio

URL = os.environ.get("ORCHESTRATOR_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
READS = 4000
BATCHES = 300
ROWS = 50

SETUP = """
DROP TABLE IF EXISTS bench_drivers;
CREATE TABLE bench_drivers (name TEXT PRIMARY KEY, state TEXT NOT NULL, attempt INT NOT NULL,
                            detail TEXT, updated_at DOUBLE PRECISION NOT NULL)
"""
UPSERT = """
INSERT INTO bench_drivers SELECT * FROM jsonb_populate_recordset(NULL::bench_drivers, {p})
ON CONFLICT (name) DO UPDATE SET state = excluded.state, attempt = excluded.attempt,
    detail = excluded.detail, updated_at = excluded.updated_at
"""
READ = "SELECT name, state, attempt, detail, updated_at FROM bench_drivers WHERE name = {p}"


def _batch(n: int) -> str:
    return json.dumps(
        [
            {"name": f"job-{(n * ROWS + i) % 2000}", "state": "training", "attempt": n,
             "detail": "x" * 40, "updated_at": time.time()}
            for i in range(ROWS)
        ]
    )  # fmt: skip


async def _psycopg() -> dict[str, float]:
    import psycopg  # type: ignore[import-not-found, unused-ignore]

    async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as conn:
        await conn.execute(SETUP)
        figures = {}
        cpu = time.process_time()
        for n in range(BATCHES):
            async with conn.transaction():
                await conn.execute(UPSERT.format(p="%s::jsonb"), (_batch(n),))
        figures["write"] = time.process_time() - cpu
        cpu = time.process_time()
        for n in range(READS):
            cur = await conn.execute(READ.format(p="%s"), (f"job-{n % 2000}",))
            await cur.fetchone()
        figures["read"] = time.process_time() - cpu
        return figures


async def _asyncpg() -> dict[str, float]:
    import asyncpg

    conn = await asyncpg.connect(URL)
    try:
        await conn.execute(SETUP)
        figures = {}
        cpu = time.process_time()
        for n in range(BATCHES):
            async with conn.transaction():
                await conn.execute(UPSERT.format(p="$1::jsonb"), _batch(n))
        figures["write"] = time.process_time() - cpu
        cpu = time.process_time()
        for n in range(READS):
            await conn.fetchrow(READ.format(p="$1"), f"job-{n % 2000}")
        figures["read"] = time.process_time() - cpu
        return figures
    finally:
        await conn.execute("DROP TABLE IF EXISTS bench_drivers")
        await conn.close()


def run() -> dict[str, Any]:
    ours = anyio.run(_asyncpg)
    results: dict[str, Any] = {
        "pg_asyncpg_read_us": round(ours["read"] / READS * 1e6, 1),
        "pg_asyncpg_batch_write_us": round(ours["write"] / BATCHES * 1e6, 1),
    }
    try:
        theirs = anyio.run(_psycopg)
    except ImportError:
        results["pg_psycopg"] = "not installed (pip install 'psycopg[binary]' to compare)"
        return results
    results["pg_psycopg_read_us"] = round(theirs["read"] / READS * 1e6, 1)
    results["pg_psycopg_batch_write_us"] = round(theirs["write"] / BATCHES * 1e6, 1)
    results["pg_psycopg_vs_asyncpg_cpu"] = round(
        (theirs["read"] + theirs["write"]) / (ours["read"] + ours["write"]), 2
    )
    return results


if __name__ == "__main__":
    for key, value in run().items():
        print(f"{key:<28} {value}")
