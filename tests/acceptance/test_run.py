"""Whole `orchestrator run` processes against the simulator; its journal is the witness."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator.simulator import SimulatorThread
from tests.conftest import (
    FAST_POLL,
    cli_env,
    example_line,
    run_cli,
    start_cli,
    status_of,
    write_dataset,
    write_manifest,
)


def mixed_manifest(tmp_path: Path, sim: SimulatorThread, count: int) -> tuple[Path, dict[str, str]]:
    """count jobs: openai uploads, bedrock with override_model, s3_key jobs, a dataset the
    simulated provider rejects, and one that fails the local checks. Returns the expected
    final state of each job."""
    jobs: list[dict[str, Any]] = []
    expected: dict[str, str] = {}
    for i in range(count):
        name = f"job-{i:03d}"
        kind = i % 10
        if kind < 6:
            write_dataset(tmp_path / f"data/{name}.jsonl", salt=name)
            jobs.append({"name": name, "dataset": f"data/{name}.jsonl"})
        elif kind < 8:
            write_dataset(tmp_path / f"data/{name}.jsonl", salt=name)
            jobs.append(
                {
                    "name": name,
                    "dataset": f"data/{name}.jsonl",
                    "provider": "bedrock",
                    "model": "amazon.titan-text-lite-v1",
                    "virtual_key": "vk-bedrock",
                    "override_model": "amazon.titan-text-lite-v1:0:4k",
                    "hyperparameters": {"epochs": 2},
                }
            )
        elif kind == 8:
            source = write_dataset(tmp_path / f"s3/{name}.jsonl", salt=name)
            sim.call(lambda s=source, n=name: sim.simulator.preload(f"datasets/{n}.jsonl", s))
            jobs.append({"name": name, "s3_key": f"datasets/{name}.jsonl"})
        else:
            path = write_dataset(tmp_path / f"data/{name}.jsonl", salt=name)
            if i % 20 == 9:  # the provider rejects an example over its length limit
                with path.open("a") as handle:
                    handle.write(example_line(99, "x" * 6000) + "\n")
            else:  # line 3 is broken JSON: the local checks catch it
                lines = path.read_text().splitlines()
                lines[2] = lines[2][:-3]
                path.write_text("\n".join(lines) + "\n")
            jobs.append({"name": name, "dataset": f"data/{name}.jsonl"})
            expected[name] = "failed"
            continue
        expected[name] = "succeeded"
    return write_manifest(tmp_path / "manifest.yaml", jobs), expected


@pytest.mark.slow
def test_200_mixed_jobs_end_right_and_a_rerun_is_a_no_op(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.simulator.config.update({"max_example_chars": 5000})
    manifest, expected = mixed_manifest(tmp_path, sim, 200)
    state = tmp_path / "state.db"
    env = cli_env(sim)
    first = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env, timeout=240)
    assert first.returncode == 1, first.stderr[-2000:]  # some jobs fail on purpose
    jobs = status_of(state, env)
    assert {name: job["state"] for name, job in jobs.items()} == expected
    for name, job in jobs.items():
        if expected[name] == "failed":
            assert job["error"]
            if int(name[-3:]) % 20 == 9:
                assert "validation failed: line 13" in job["error"]
            else:
                assert f"{name}.jsonl:3: not valid JSON" in job["error"]
                assert job["finetune_id"] is None  # never reached the gateway
        else:
            assert job["fine_tuned_model"]
    bedrock = [j for n, j in jobs.items() if int(n[-3:]) % 10 in (6, 7)]
    assert all(
        j["fine_tuned_model"].startswith("ft:amazon.titan-text-lite-v1:0:4k:") for j in bedrock
    )

    journal = sim.journal
    started = [j["finetune_id"] for j in jobs.values() if j["state"] == "succeeded"]
    assert all(journal.starts[f] == 1 for f in started)
    assert sum(journal.starts.values()) == sum(1 for v in expected.values() if v == "succeeded")
    assert max(journal.finetune_creates.values()) == 1
    assert max(journal.dataset_creates.values()) == 1
    assert journal.storage_api_key_leaks == 0 and journal.storage_chunked == 0

    before = journal.as_json()["requests"]
    again = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    assert again.returncode == 1
    assert sim.journal.as_json()["requests"] == before  # nothing sent at all


# SIGKILL at random moments across a run: tests/acceptance/test_evidence.py (crash suite).


def test_lost_responses_after_creates_and_starts_do_not_duplicate(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.simulator.config.update({"lost_response_rate": 0.25})
    jobs = [{"name": f"l-{i:02d}", "dataset": f"data/l-{i:02d}.jsonl"} for i in range(20)]
    for job in jobs:
        write_dataset(tmp_path / job["dataset"], salt=job["name"])
    manifest = write_manifest(tmp_path / "manifest.yaml", jobs)
    state = tmp_path / "state.db"
    env = cli_env(sim)
    out = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    journal = sim.journal
    assert journal.faults["lost_response"] > 5
    assert all(n == 1 for n in journal.finetune_creates.values())
    assert all(n == 1 for n in journal.dataset_creates.values())
    assert len(journal.starts) == 20 and all(n == 1 for n in journal.starts.values())


def test_sigint_stops_with_130_and_the_rerun_resumes(sim: SimulatorThread, tmp_path: Path) -> None:
    sim.simulator.config.update({"training_seconds": 3.0})
    jobs = [{"name": f"s-{i}", "dataset": f"data/s-{i}.jsonl"} for i in range(5)]
    for job in jobs:
        write_dataset(tmp_path / job["dataset"], salt=job["name"])
    manifest = write_manifest(tmp_path / "manifest.yaml", jobs)
    state = tmp_path / "state.db"
    env = cli_env(sim)
    process = start_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum(sim.journal.starts.values()) < 5:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    states = status_of(state, env)
    assert all(j["state"] == "training" for j in states.values())
    final = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    assert final.returncode == 0
    assert all(n == 1 for n in sim.journal.starts.values())


def test_until_submitted_then_done(sim: SimulatorThread, tmp_path: Path) -> None:
    sim.simulator.config.update({"training_seconds": 1.0})
    write_dataset(tmp_path / "data/a.jsonl")
    manifest = write_manifest(tmp_path / "m.yaml", [{"name": "a", "dataset": "data/a.jsonl"}])
    state = tmp_path / "state.db"
    env = cli_env(sim)
    submitted = run_cli(
        "run", str(manifest), "--state", str(state), "--until", "submitted", *FAST_POLL, env=env
    )
    assert submitted.returncode == 0
    assert status_of(state, env)["a"]["state"] == "training"
    done = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    assert done.returncode == 0
    assert status_of(state, env)["a"]["state"] == "succeeded"
