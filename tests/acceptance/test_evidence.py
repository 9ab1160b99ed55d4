"""The claims users rely on, under injected faults and random SIGKILLs: every job ends in
its correct state, nothing is created or started twice, and `status` agrees with the
gateway's own journal."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.simulator import SimulatorThread
from tests.acceptance.test_run import mixed_manifest
from tests.conftest import (
    FAST_POLL,
    cli_args,
    cli_env,
    run_cli,
    status_of,
)


def assert_invariants(
    sim: SimulatorThread, jobs: dict[str, dict[str, Any]], expected: dict[str, str]
) -> None:
    assert {n: j["state"] for n, j in jobs.items()} == expected
    journal = sim.journal
    # One finetune and one dataset per job that reached the gateway; never a second.
    reached = [n for n, j in jobs.items() if j["finetune_id"]]
    assert all(journal.finetune_creates[n] == 1 for n in reached)
    assert set(journal.finetune_creates) == set(reached)
    assert all(n == 1 for n in journal.dataset_creates.values())
    # Exactly one accepted /start per started finetune, and none for the others.
    started = {j["finetune_id"] for j in jobs.values() if j["state"] == "succeeded"}
    assert set(journal.starts) == started and all(journal.starts[f] == 1 for f in started)
    # status agrees with the gateway for every job.
    world = sim.simulator.world
    for name, job in jobs.items():
        if not job["finetune_id"]:
            assert expected[name] == "failed" and ":3: not valid JSON" in job["error"]
            continue
        remote = sim.call(lambda f=job["finetune_id"]: world.finetune_json(world.finetune(f)))
        assert remote["name"] == name and remote["status"] == job["remote_status"]
        assert remote["slug"] == job["fine_tuned_model"]


@pytest.mark.slow
def test_fault_suite_300_jobs(sim: SimulatorThread, tmp_path: Path) -> None:
    sim.simulator.config.update({"max_example_chars": 5000})
    manifest, expected = mixed_manifest(tmp_path, sim, 300)
    sim.simulator.config.update(
        {
            "error_rate": 0.10,
            "rate_limit_rate": 0.05,
            "retry_after": 0.1,
            "drop_rate": 0.02,
            "lost_response_rate": 0.02,
            "latency": 0.002,
            "latency_jitter": 0.01,
            "storage_error_rate": 0.05,
        }
    )
    state = tmp_path / "state.db"
    env = cli_env(sim)
    out = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env, timeout=280)
    assert out.returncode == 1, out.stderr[-3000:]  # the truth: some jobs failed on purpose
    faults = sim.journal.faults
    assert faults["lost_response"] > 10 and faults["dropped"] > 10 and faults["429"] > 50
    assert_invariants(sim, status_of(state, env), expected)


@pytest.mark.slow
def test_crash_suite_sigkill_at_random_moments(sim: SimulatorThread, tmp_path: Path) -> None:
    sim.simulator.config.update({"max_example_chars": 5000})
    manifest, expected = mixed_manifest(tmp_path, sim, 120)
    sim.simulator.config.update(
        {
            "validation_seconds": 2.0,
            # Long enough that a dozen kills land before the run can finish.
            "training_seconds": 4.0,
            "latency": 0.002,
            "latency_jitter": 0.02,
            "lost_response_rate": 0.02,
        }
    )
    state = tmp_path / "state.db"
    env = cli_env(sim)
    rng = random.Random(20261126)
    args = cli_args("run", str(manifest), "--state", str(state), *FAST_POLL)
    kills = 0
    for _ in range(40):
        process = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(rng.uniform(0.3, 1.5))
        if process.poll() is not None:
            break  # finished before this kill
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        if kills >= 12:
            break
    final = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    assert final.returncode == 1, final.stderr[-3000:]
    assert kills >= 10
    assert_invariants(sim, status_of(state, env), expected)
