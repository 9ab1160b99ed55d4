"""One manifest through both API dialects (the gateway's finetune flow and the
OpenAI-compatible fine_tuning flow) against the simulator, with faults and SIGKILLs:
every job ends right, and the journal shows one create per job in each."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.simulator import SimulatorThread
from tests.conftest import (
    FAST_POLL,
    cli_args,
    cli_env,
    run_cli,
    start_cli,
    status_of,
    write_dataset,
    write_manifest,
)

SIM_EVENTS = (  # what the simulator's jobs say, in order (a job's id may follow)
    "Created fine-tuning job",
    "Validating training file",
    "Files validated, job queued",
    "Fine-tuning job started",
    "Fine-tuning job cancelled",
)


def dialect_manifest(tmp_path: Path, api: str, count: int) -> tuple[Path, dict[str, str]]:
    """``count`` jobs of ``api``; every fifth shares its dataset with the one before, and
    the last has a dataset the simulated provider rejects."""
    jobs: list[dict[str, Any]] = []
    expected: dict[str, str] = {}
    for i in range(count):
        name = f"{api}-{i:02d}"
        salt = f"{api}-{i - 1 if i % 5 == 4 else i}"
        extra = "x" * 6000 if i == count - 1 else ""
        write_dataset(tmp_path / f"data/{name}.jsonl", salt=salt + extra)
        job: dict[str, Any] = {"name": name, "dataset": f"data/{name}.jsonl"}
        if api == "fine_tuning":
            job.update(suffix=f"s{i}", metadata={"batch": "acceptance"})
        jobs.append(job)
        expected[name] = "failed" if i == count - 1 else "succeeded"
    manifest = write_manifest(tmp_path / f"{api}.yaml", jobs, gateway={"api": api})
    return manifest, expected


@pytest.mark.slow
def test_both_dialects_under_faults_and_kills_create_each_job_once(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.simulator.config.update(
        {
            "max_example_chars": 5000,
            "validation_seconds": 1.0,
            "training_seconds": 2.0,
            "error_rate": 0.05,
            "lost_response_rate": 0.05,
            "latency": 0.002,
            "latency_jitter": 0.01,
        }
    )
    env = cli_env(sim)
    rng = random.Random(20261130)
    for api in ("finetune", "fine_tuning"):
        manifest, expected = dialect_manifest(tmp_path, api, 20)
        state = tmp_path / f"{api}.db"
        args = cli_args("run", str(manifest), "--state", str(state), *FAST_POLL)
        for _ in range(3):  # killed at random moments, resumed each time
            process = subprocess.Popen(
                args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            time.sleep(rng.uniform(0.4, 1.2))
            process.send_signal(signal.SIGKILL)
            process.wait()
        final = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
        assert final.returncode == 1, final.stderr[-3000:]  # one job fails on purpose
        jobs = status_of(state, env)
        assert {n: j["state"] for n, j in jobs.items()} == expected
        creates = {n: sim.journal.finetune_creates[n] for n in expected}
        assert creates == dict.fromkeys(expected, 1)  # one create per job, kills or not
        assert all(j["fine_tuned_model"] for j in jobs.values() if j["state"] == "succeeded")
    rejected = status_of(tmp_path / "fine_tuning.db", env)["fine_tuning-19"]
    assert "example longer than 5000 characters" in rejected["error"]
    # The same content went up once as a file, whatever the kills and lost answers did.
    files = {k: v for k, v in sim.journal.dataset_creates.items() if k.startswith("ft-")}
    assert len(files) == 20 - 3 and set(files.values()) == {1}  # 3 share a neighbour's
    assert sim.journal.faults["lost_response"] > 3


def test_a_fine_tuning_job_is_cancelled_and_its_events_are_in_the_history(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.simulator.config.update({"validation_seconds": 0.5, "training_seconds": 30.0})
    manifest, _ = dialect_manifest(tmp_path, "fine_tuning", 2)
    state = tmp_path / "state.db"
    env = cli_env(sim)
    running = start_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if (
                state.exists()
                and status_of(state, env).get("fine_tuning-00", {}).get("state") == "training"
            ):
                break
            time.sleep(0.2)
        out = run_cli("cancel", "fine_tuning-00", "--state", str(state), env=env)
        assert out.returncode == 0 and "cancelled" in out.stdout, out.stdout + out.stderr
    finally:
        running.kill()
        running.communicate()
    job = status_of(state, env)["fine_tuning-00"]
    assert job["state"] == "cancelled" and sim.journal.cancels[job["finetune_id"]] == 1
    history = run_cli("status", "fine_tuning-00", "--history", "--state", str(state), env=env)
    # The newest event seen at each poll is a history row that keeps the state.
    seen = re.findall(r"(\w+) -> \1  \(event: ([^)]*)\)", history.stdout)
    assert seen and all(message.startswith(SIM_EVENTS) for _, message in seen), history.stdout
    assert "-> cancelled" in history.stdout


def test_a_validation_dataset_is_checked_uploaded_once_and_sent(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    write_dataset(tmp_path / "data/train.jsonl", salt="t")
    write_dataset(tmp_path / "data/valid.jsonl", salt="v")
    (tmp_path / "data/broken.jsonl").write_text('{"messages": [\n')
    jobs = [
        {
            "name": "with-validation",
            "dataset": "data/train.jsonl",
            "validation_dataset": "data/valid.jsonl",
        },
        {
            "name": "same-validation",
            "dataset": "data/valid.jsonl",
            "validation_dataset": "data/valid.jsonl",
            "suffix": "other",
        },
        {
            "name": "bad-validation",
            "dataset": "data/train.jsonl",
            "validation_dataset": "data/broken.jsonl",
        },
    ]
    manifest = write_manifest(tmp_path / "m.yaml", jobs, gateway={"api": "fine_tuning"})
    state = tmp_path / "state.db"
    env = cli_env(sim)
    out = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    assert out.returncode == 1, out.stderr[-2000:]  # the broken one fails here
    found = status_of(state, env)
    assert found["with-validation"]["state"] == found["same-validation"]["state"] == "succeeded"
    assert found["bad-validation"]["state"] == "failed"
    assert "broken.jsonl:1" in found["bad-validation"]["error"]
    assert "bad-validation" not in sim.journal.finetune_creates  # nothing sent for it
    world = sim.simulator.jobs.world
    sent = {
        j.name: (world.files[j.training_file].filename, j.validation_file)
        for j in world.jobs.values()
    }
    valid_id = world.jobs[found["with-validation"]["finetune_id"]].validation_file
    assert valid_id is not None and world.files[valid_id].bytes > 0
    # One upload per content: valid.jsonl went up once, for both jobs and both uses.
    assert sent["same-validation"][1] == valid_id
    assert sum(1 for f in world.files.values()) == 2
