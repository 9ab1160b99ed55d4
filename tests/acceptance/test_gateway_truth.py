"""The gateway is the truth, through whole CLI processes: odd answers, other spellings, a
lost state file, a dataset changed under us, a gateway that echoes secrets, a state
file that fails. The simulator's journal is the witness: never a second create or
start."""

from __future__ import annotations

import json
import resource
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.simulator import SimulatorThread
from orchestrator.simulator.world import UNKNOWN_SUCCESS
from tests.acceptance.test_evidence import assert_invariants
from tests.acceptance.test_run import mixed_manifest
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


def one_line_error(stderr: str) -> str:
    """The CLI's error: exactly one line, never a traceback."""
    assert "Traceback" not in stderr and "ExceptionGroup" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.mark.slow
def test_odd_answers_other_spellings_and_error_objects_lose_nothing(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.simulator.config.update({"max_example_chars": 5000})
    manifest, expected = mixed_manifest(tmp_path, sim, 100)
    sim.simulator.config.update(
        {
            "odd_answer_rate": 0.08,
            "lost_response_rate": 0.02,
            "status_spelling": "alternative",
            "error_shape": "object",
        }
    )
    state = tmp_path / "state.db"
    env = cli_env(sim)
    out = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env, timeout=280)
    assert out.returncode == 1, out.stderr[-3000:]  # some jobs fail on purpose
    faults = sim.journal.faults
    kinds = {"html_200", "html_502", "cut_before", "cut_after", "success_false", "no_data"}
    assert all(faults[f"odd_{kind}"] > 0 for kind in kinds | {"no_fields", "not_found"}), faults
    jobs = status_of(state, env)
    assert_invariants(sim, jobs, expected)
    rejected = [j for j in jobs.values() if j["finetune_id"] and j["state"] == "failed"]
    assert rejected and all("example longer than" in j["error"] for j in rejected)
    # run's summary names the failed jobs with the gateway's reason.
    assert "failed: validation failed: line 13: example longer than" in out.stdout


def test_a_finished_manifest_rerun_on_a_fresh_state_file_starts_nothing(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.simulator.config.update({"max_example_chars": 5000})
    manifest, expected = mixed_manifest(tmp_path, sim, 10)
    env = cli_env(sim)
    first = run_cli("run", str(manifest), "--state", str(tmp_path / "one.db"), *FAST_POLL, env=env)
    assert first.returncode == 1, first.stderr[-2000:]
    before = sim.journal.as_json()
    # Another machine, or a deleted .orchestrator/: nothing but the manifest is shared.
    again = run_cli("run", str(manifest), "--state", str(tmp_path / "two.db"), *FAST_POLL, env=env)
    assert again.returncode == 1, again.stderr[-2000:]
    after = sim.journal.as_json()
    assert after["starts"] == before["starts"] and after["uploads"] == before["uploads"]
    assert after["finetune_creates"] == before["finetune_creates"]
    assert after["dataset_creates"] == before["dataset_creates"]
    assert after["requests"].get("update_finetune") == before["requests"].get("update_finetune")
    one, two = status_of(tmp_path / "one.db", env), status_of(tmp_path / "two.db", env)
    assert {n: j["state"] for n, j in two.items()} == expected
    for name, job in two.items():
        assert job["finetune_id"] == one[name]["finetune_id"]
        assert job["fine_tuned_model"] == one[name]["fine_tuned_model"]
        assert job["error"] == one[name]["error"]


def test_a_dataset_changed_before_its_upload_fails_and_is_never_shared(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.simulator.config.update({"latency": 0.5})  # time to edit the file meanwhile
    data = write_dataset(tmp_path / "data/a.jsonl", salt="before")
    manifest = write_manifest(
        tmp_path / "m.yaml",
        [{"name": "a", "dataset": "data/a.jsonl"}, {"name": "b", "dataset": "data/a.jsonl"}],
    )
    state = tmp_path / "state.db"
    env = cli_env(sim)
    process = start_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    deadline = time.monotonic() + 30
    while not sim.journal.requests["get_finetune"] and time.monotonic() < deadline:
        time.sleep(0.01)  # the preflight: the datasets were checked and hashed before it
    write_dataset(data, salt="after")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1, err[-2000:]
    jobs = status_of(state, env)
    for job in jobs.values():
        assert job["state"] == "failed" and "dataset changed while uploading" in job["error"]
        assert job["abandoned_datasets"] and job["finetune_id"] is None
    assert not sim.journal.finetune_creates
    with sqlite3.connect(state) as db:
        assert db.execute("SELECT count(*) FROM datasets").fetchone()[0] == 0  # never shared
    # Run again: the new content is checked, uploaded and trained.
    rerun = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]


def test_a_gateway_that_echoes_secrets_never_gets_them_stored_or_shown(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.simulator.config.update({"echo_secrets": True})
    write_dataset(tmp_path / "data/a.jsonl")
    password = "pa55-w0rd-xyz"
    url = sim.url.replace("http://", f"http://admin:{password}@")
    manifest = write_manifest(
        tmp_path / "m.yaml",
        [{"name": "a", "dataset": "data/a.jsonl", "virtual_key": "vk-unknown-team"}],
        gateway={"base_url": url},
    )
    state = tmp_path / "state.db"
    env = cli_env(sim)
    del env["PORTKEY_BASE_URL"]
    key = env["PORTKEY_API_KEY"]
    run = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    assert run.returncode == 1, run.stderr[-2000:]
    status = run_cli("status", "--state", str(state), "--history", "a", env=env)
    as_json = run_cli("status", "--json", "--state", str(state), env=env)
    job = json.loads(as_json.stdout)[0]
    assert "does not exist" in job["error"] and "***" in job["error"]  # the reason stays
    assert "?<redacted>" in job["error"]
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
    shown = run.stdout + run.stderr + status.stdout + status.stderr + as_json.stdout
    for secret in (key, password, "X-Amz-Signature"):
        assert secret.encode() not in stored, secret
        assert secret not in shown, secret


def test_an_unknown_status_keeps_polling_and_the_suggested_line_maps_it(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.simulator.config.update({"status_spelling": "unknown"})
    write_dataset(tmp_path / "data/a.jsonl")
    jobs = [{"name": "a", "dataset": "data/a.jsonl"}]
    manifest = write_manifest(tmp_path / "m.yaml", jobs)
    state = tmp_path / "state.db"
    env = cli_env(sim)
    process = start_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if state.exists() and status_of(state, env).get("a", {}).get("unknown_status_since"):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130 and "Traceback" not in err, err[-2000:]
    job = status_of(state, env)["a"]
    assert job["state"] == "training" and job["remote_status"] == UNKNOWN_SUCCESS
    table = run_cli("status", "--state", str(state), env=env).stdout
    assert f"{UNKNOWN_SUCCESS} (unknown)" in table
    # The line the notice suggests, added to the manifest, ends the job.
    write_manifest(tmp_path / "m.yaml", jobs, statuses={"succeeded": [UNKNOWN_SUCCESS]})
    done = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sum(sim.journal.starts.values()) == 1


def test_state_file_faults_are_one_line(sim: SimulatorThread, tmp_path: Path) -> None:
    write_dataset(tmp_path / "data/a.jsonl")
    manifest = write_manifest(tmp_path / "m.yaml", [{"name": "a", "dataset": "data/a.jsonl"}])
    env = cli_env(sim)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for state, code in ((blocker / "state.db", 2), (tmp_path / "garbage.db", 2)):
        if state.parent.is_dir():
            state.write_bytes(b"SQLite format 3\0" + b"\x07" * 5000)
        out = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
        assert out.returncode == code, out.stderr
        assert str(state) in one_line_error(out.stderr)
    assert not sim.journal.requests["create_dataset"]  # nothing was sent
    # A real state file whose pages are damaged.
    state = tmp_path / "state.db"
    assert run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env).returncode == 0
    with state.open("r+b") as handle:
        handle.seek(4096)
        handle.write(b"\xff" * 8192)
    for command in (["status"], ["run", str(manifest), *FAST_POLL]):
        out = run_cli(*command, "--state", str(state), env=env)
        assert out.returncode == 2, out.stderr
        assert "malformed" in one_line_error(out.stderr)


def test_a_full_disk_mid_run_is_one_line_and_a_rerun_resumes(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    jobs = []
    for i in range(60):
        write_dataset(tmp_path / f"data/{i}.jsonl", salt=str(i))
        jobs.append({"name": f"job-{i}", "dataset": f"data/{i}.jsonl"})
    manifest = write_manifest(tmp_path / "m.yaml", jobs)
    state = tmp_path / "state.db"
    env = cli_env(sim)

    def small_files() -> None:  # the OS refuses to let a file grow past 256 KiB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    process = subprocess.run(
        cli_args("run", str(manifest), "--state", str(state), *FAST_POLL),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=small_files,
    )
    assert process.returncode == 1, process.stderr[-3000:]
    assert str(state) in one_line_error(process.stderr)
    assert len(status_of(state, env)) > 0 and sim.journal.requests["create_dataset"]
    rerun = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert all(j["state"] == "succeeded" for j in status_of(state, env).values())
    assert all(n == 1 for n in sim.journal.finetune_creates.values())
    assert all(n == 1 for n in sim.journal.starts.values())


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_interrupts_at_any_moment_never_print_a_traceback(
    sim: SimulatorThread, tmp_path: Path, delay: float
) -> None:
    jobs = []
    for i in range(300):
        write_dataset(tmp_path / f"data/{i}.jsonl", salt=str(i))
        jobs.append({"name": f"job-{i}", "dataset": f"data/{i}.jsonl"})
    manifest = write_manifest(tmp_path / "m.yaml", jobs)
    process = subprocess.Popen(
        cli_args("run", str(manifest), "--state", str(tmp_path / "s.db"), *FAST_POLL),
        env=cli_env(sim),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # a second one, impatient
    _, err = process.communicate(timeout=60)
    # 130, or killed by the second SIGINT on its way out: both say "interrupted".
    assert process.returncode in (130, -signal.SIGINT, 0), err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
