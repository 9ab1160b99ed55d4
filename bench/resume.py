"""Time from `orchestrator run` starting to its first resumed transition, with 10,000 jobs
in the state file (all waiting to create their finetune)."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import yaml

from bench.harness import cli, orchestrator_env, simulator
from orchestrator.lifecycle import CREATE_FINETUNE
from orchestrator.manifest import load_manifest
from orchestrator.states import JobRecord, State, Transition
from orchestrator.store import SqliteStore


async def _seed(state: Path, manifest: Path) -> None:
    store = SqliteStore(state)
    try:
        for job in load_manifest(manifest, {}).jobs:
            record = JobRecord(
                name=job.name,
                fingerprint=job.fingerprint(None),
                state=State.DATASET_READY,
                intent=CREATE_FINETUNE,  # as this version saves a job that reached it
                manifest=str(manifest),
                dataset_id=f"ds_{job.name}",
                s3_key=job.s3_key,
            )
            await store.save(record, Transition(job.name, None, State.DATASET_READY, 0.0))
    finally:
        store.close()


def run(jobs: int = 10_000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp, simulator() as sim:
        folder = Path(tmp)
        manifest = folder / "manifest.yaml"
        manifest.write_text(
            yaml.safe_dump(
                {
                    "defaults": {"provider": "openai", "model": "gpt-4o-mini", "virtual_key": "vk"},
                    "jobs": [
                        {"name": f"job-{n:05d}", "s3_key": f"datasets/job-{n:05d}.jsonl"}
                        for n in range(jobs)
                    ],
                }
            )
        )
        state = folder / "state.db"
        anyio.run(_seed, state, manifest)
        started = time.time()
        process = subprocess.Popen(
            # --verbose: the first resumed transition is a step between milestones.
            cli("run", str(manifest), "--state", str(state), "--until", "submitted", "--verbose"),
            env=orchestrator_env(sim),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        first = None
        for line in process.stderr:
            if '"transition"' in line:
                event = json.loads(line)
                first = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
                break
        process.kill()
        process.wait()
        assert first is not None, "no transition was logged"
        return {
            "resume_first_transition_s": round(first.timestamp() - started, 3),
            "resume_jobs_in_state": jobs,
        }
