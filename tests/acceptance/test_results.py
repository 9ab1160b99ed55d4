"""What a user hands on and keeps tidy: `results` in three formats, `status` filters and
follow mode, `forget`."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import time
from pathlib import Path

from orchestrator.simulator import SimulatorThread
from tests.acceptance.test_run import mixed_manifest
from tests.conftest import (
    FAST_POLL,
    cli_args,
    cli_env,
    run_cli,
    status_of,
    write_dataset,
    write_manifest,
)


def test_results_in_three_formats_with_filters(sim: SimulatorThread, tmp_path: Path) -> None:
    sim.simulator.config.update({"max_example_chars": 5000})
    manifest, expected = mixed_manifest(tmp_path, sim, 20)
    state = tmp_path / "s.db"
    env = cli_env(sim)
    assert run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env).returncode == 1
    as_json = run_cli("results", "--format", "json", "--state", str(state), env=env)
    rows = {row["name"]: row for row in json.loads(as_json.stdout)}
    assert {n: r["state"] for n, r in rows.items()} == expected
    won = rows["job-000"]
    assert won["fine_tuned_model"].startswith("ft:gpt-4o-mini:job-000")
    assert won["provider"] == "openai" and won["base_model"] == "gpt-4o-mini"
    assert won["records"] == 12 and won["units"] == 12 and won["reason"] is None
    assert won["training_seconds"] is not None and won["manifest"] == str(manifest)
    bedrock = rows["job-006"]
    assert bedrock["base_model"] == "amazon.titan-text-lite-v1" and bedrock["units"] == 24
    lost = rows["job-009"]
    assert lost["fine_tuned_model"] is None and "validation failed" in lost["reason"]
    as_csv = run_cli("results", "--format", "csv", "--state", str(state), env=env).stdout
    parsed = list(csv.DictReader(io.StringIO(as_csv)))
    assert [r["name"] for r in parsed] == sorted(expected)
    assert parsed[0]["fine_tuned_model"] == rows["job-000"]["fine_tuned_model"]
    failed = run_cli("results", "--where", "state=failed", "--state", str(state), env=env)
    lines = failed.stdout.strip().splitlines()
    assert lines[0].split()[:2] == ["name", "state"]
    assert {line.split()[0] for line in lines[1:]} == {
        n for n, s in expected.items() if s == "failed"
    }
    globbed = run_cli("results", "job-00*", "--format", "json", "--state", str(state), env=env)
    assert {r["name"] for r in json.loads(globbed.stdout)} == {f"job-00{i}" for i in range(10)}
    bad = run_cli("results", "--where", "colour=red", "--state", str(state), env=env)
    assert bad.returncode == 2 and "--where colour=red: expected KEY=VALUE" in bad.stderr


def test_status_filters_by_manifest_and_follows_until_the_end(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.simulator.config.update({"training_seconds": 2.0})
    write_dataset(tmp_path / "data/a.jsonl")
    one = write_manifest(tmp_path / "one.yaml", [{"name": "a", "dataset": "data/a.jsonl"}])
    two = write_manifest(tmp_path / "two.yaml", [{"name": "b", "dataset": "data/a.jsonl"}])
    state = tmp_path / "s.db"
    env = cli_env(sim)
    assert run_cli("run", str(one), "--state", str(state), *FAST_POLL, env=env).returncode == 0
    runner = subprocess.Popen(
        cli_args("run", str(two), "--state", str(state), *FAST_POLL),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while "b" not in status_of(state, env) and time.monotonic() < deadline:
            time.sleep(0.1)
        only_two = run_cli("status", "--manifest", str(two), "--state", str(state), env=env)
        names = [line.split()[0] for line in only_two.stdout.splitlines()[1:]]
        assert names == ["b"]
        watched = run_cli(
            "status", "--watch", "--manifest", str(two), "--state", str(state), env=env, timeout=60
        )
        assert watched.returncode == 0, watched.stderr
        assert status_of(state, env)["b"]["state"] == "succeeded"  # it returned at the end
        assert "succeeded" in watched.stdout
    finally:
        runner.wait(timeout=60)


def test_forget_removes_finished_jobs_and_refuses_those_in_flight(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.simulator.config.update({"training_seconds": 60.0})
    write_dataset(tmp_path / "data/a.jsonl")
    jobs = [{"name": n, "dataset": "data/a.jsonl"} for n in ("a", "b", "c")]
    manifest = write_manifest(tmp_path / "m.yaml", jobs)
    state = tmp_path / "s.db"
    env = cli_env(sim)
    run = run_cli("run", str(manifest), "--state", str(state), "--until", "submitted", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run_cli("cancel", "a", "b", "--state", str(state), env=env).returncode == 0
    refused = run_cli("forget", "a", "c", "--state", str(state), env=env)
    assert refused.returncode == 2 and "still in flight, not forgotten: c" in refused.stderr
    assert set(status_of(state, env)) == {"a", "b", "c"}
    # Its manifest needs a variable this shell lacks: it still names the job.
    write_manifest(manifest, jobs, gateway={"api_key": "${KEY_NOT_SET_HERE}"})
    named = run_cli("forget", "a", "--state", str(state), env=env)
    assert named.returncode == 2  # a run of m.yaml would submit it again
    assert "still named by their manifest, not forgotten: a" in named.stderr
    out = run_cli("forget", "[a]*", "--force", "--state", str(state), env=env)  # a glob
    assert out.returncode == 0 and out.stdout.strip() == "forgot 1 job: a"
    write_manifest(manifest, [jobs[2]])  # only c is named now
    out = run_cli("forget", "--finished-before", "2999-01-01", "--state", str(state), env=env)
    assert out.stdout.strip() == "forgot 1 job: b"
    assert set(status_of(state, env)) == {"c"}
    history = run_cli("status", "a", "--history", "--state", str(state), env=env)
    assert history.returncode == 2  # gone, history and all
