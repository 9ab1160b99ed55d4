"""A file through the Uploads API in parts, against the simulator: exact bytes in
order, the whole file's MD5 checked by the server, a part that fails sent again alone."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from orchestrator.datasets import DatasetReport
from orchestrator.lifecycle import JobRun
from orchestrator.manifest import JobSpec
from orchestrator.metrics import Metrics
from orchestrator.retry import RetryPolicy
from orchestrator.runner import Gateway, open_engine
from orchestrator.settings import EngineSettings, UploadSettings
from orchestrator.simulator import SimulatorThread
from orchestrator.states import JobRecord
from orchestrator.statuses import default_status_map
from orchestrator.store import MemoryStore
from orchestrator.upload_parts import upload_in_parts

pytestmark = pytest.mark.anyio
FAST = EngineSettings(
    upload=UploadSettings(retry=RetryPolicy(initial=0.01, maximum=0.05, max_attempts=12))
)


async def send_in_parts(sim: SimulatorThread, source: Path, part_bytes: int) -> tuple[str, str]:
    body = await anyio.Path(source).read_bytes()
    gateway = Gateway(sim.url, sim.simulator.config.api_key, "bearer")
    async with open_engine(
        gateway, default_status_map(), MemoryStore(), FAST, Metrics(), preflight=False
    ) as engine:
        spec = JobSpec(
            "big", "openai", "gpt-4o-mini", "", {}, None, source, None, api="fine_tuning"
        )
        report = DatasetReport(source, len(body), hashlib.sha256(body).hexdigest())
        run = JobRun(spec, JobRecord("big", "f", api="fine_tuning"), report)
        return await upload_in_parts(engine.lc, run, source, "big.jsonl", part_bytes=part_bytes)


async def test_parts_arrive_in_order_and_make_the_file(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    source = tmp_path / "big.jsonl"
    source.write_bytes(bytes(range(256)) * 4001)  # not a multiple of the part size
    file_id, sha256 = await send_in_parts(sim, source, part_bytes=100_000)
    body = source.read_bytes()
    assert sha256 == hashlib.sha256(body).hexdigest()
    stored = sim.simulator.jobs.world.files[file_id]
    assert stored.path.read_bytes() == body and stored.filename == "big.jsonl"
    upload = next(iter(sim.simulator.jobs.world.uploads.values()))
    assert len(upload.parts) == 11 and upload.status == "completed"  # the md5 was checked


async def test_a_failing_part_is_sent_again_alone(sim: SimulatorThread, tmp_path: Path) -> None:
    sim.simulator.config.update({"error_rate": 0.3, "seed": 3})
    source = tmp_path / "big.jsonl"
    source.write_bytes(bytes(range(251)) * 2000)
    file_id, sha256 = await send_in_parts(sim, source, part_bytes=50_000)
    assert sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert sim.simulator.jobs.world.files[file_id].path.read_bytes() == source.read_bytes()
    assert sim.journal.faults["500"] + sim.journal.faults["502"] + sim.journal.faults["503"] > 0


async def test_a_restart_goes_on_from_the_next_part(sim: SimulatorThread, tmp_path: Path) -> None:
    from orchestrator.openai_api import FineTuningClient

    source = tmp_path / "big.jsonl"
    source.write_bytes(bytes(range(256)) * 1000)  # 256,000 bytes: 6 parts of 50,000
    body = await anyio.Path(source).read_bytes()
    key = sim.simulator.config.api_key
    # What a process that died after two parts left: the upload, and its two parts.
    async with FineTuningClient(sim.url, key, auth="bearer") as client:
        upload = await client.create_upload("big.jsonl", len(body), None)
        parts = []
        for offset in (0, 50_000):

            async def chunk(o: int = offset) -> AsyncIterator[bytes]:
                yield body[o : o + 50_000]

            parts.append((await client.add_part(upload.id, 50_000, chunk(), None)).id)
    progress = {"name": "big.jsonl", "upload_id": upload.id, "part_bytes": 50_000, "parts": parts}
    gateway = Gateway(sim.url, key, "bearer")
    store = MemoryStore()
    async with open_engine(
        gateway, default_status_map(), store, FAST, Metrics(), preflight=False
    ) as engine:
        spec = JobSpec(
            "big", "openai", "gpt-4o-mini", "", {}, None, source, None, api="fine_tuning"
        )
        record = JobRecord("big", "f", api="fine_tuning", upload_progress=progress)
        run = JobRun(
            spec, record, DatasetReport(source, len(body), hashlib.sha256(body).hexdigest())
        )
        file_id, sha256 = await upload_in_parts(
            engine.lc, run, source, "big.jsonl", part_bytes=50_000
        )
    assert sha256 == hashlib.sha256(body).hexdigest()
    stored = sim.simulator.jobs.world.uploads[upload.id]
    assert len(stored.parts) == 6  # the two sent before, and four more: none sent twice
    assert sim.simulator.jobs.world.files[file_id].path.read_bytes() == body
    assert run.record.upload_progress is None and store.jobs["big"].upload_progress is None
