"""Send one file through /v1/uploads in 64 MB parts; print the seconds it took and the
file's id (for bench.parts)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import anyio

from bench.harness import API_KEY
from orchestrator.datasets import DatasetReport
from orchestrator.lifecycle import JobRun
from orchestrator.manifest import JobSpec
from orchestrator.metrics import Metrics
from orchestrator.runner import Gateway, open_engine
from orchestrator.settings import EngineSettings
from orchestrator.states import JobRecord
from orchestrator.statuses import default_status_map
from orchestrator.store import MemoryStore
from orchestrator.upload_parts import upload_in_parts


async def main(url: str, path: Path, size: int) -> None:
    gateway = Gateway(url, API_KEY, "bearer")
    async with open_engine(
        gateway, default_status_map(), MemoryStore(), EngineSettings(), Metrics(), preflight=False
    ) as engine:
        spec = JobSpec("bench", "openai", "m", "", {}, None, path, None, api="fine_tuning")
        run = JobRun(
            spec,
            JobRecord("bench", "f", api="fine_tuning"),
            DatasetReport(path, size),
        )
        started = time.perf_counter()
        file_id, _ = await upload_in_parts(engine.lc, run, path, path.name)
        print(f"{time.perf_counter() - started:.6f} {file_id}")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], Path(sys.argv[2]), Path(sys.argv[2]).stat().st_size)
