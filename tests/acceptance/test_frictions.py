"""What a new user trips over first: each one a clear line, and the README's examples
working as written."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from orchestrator.simulator import SimulatorThread
from tests.conftest import (
    FAST_POLL,
    cli_args,
    cli_env,
    run_cli,
    status_of,
    write_dataset,
    write_manifest,
)


def test_a_listen_port_out_of_range_is_refused(tmp_path: Path) -> None:
    (tmp_path / "watch").mkdir()
    out = run_cli(
        "daemon", "--watch", str(tmp_path / "watch"), "--listen", "127.0.0.1:99999", env=cli_env()
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: --listen 127.0.0.1:99999: expected HOST:PORT with a port from 0 to 65535, "
        "for example 127.0.0.1:9464"
    )


def test_validate_says_how_many_more_problems_and_counts_in_words(tmp_path: Path) -> None:
    bad = tmp_path / "data/bad.jsonl"
    bad.parent.mkdir()
    bad.write_text("".join("{not json\n" for _ in range(25)))
    manifest = write_manifest(tmp_path / "m.yaml", [{"name": "a", "dataset": "data/bad.jsonl"}])
    out = run_cli("validate", str(manifest), env=cli_env())
    assert out.returncode == 2
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 21 and errors[-1] == f"error: ... and 5 more problems in {bad}"
    write_dataset(bad)
    ok = run_cli("validate", str(manifest), env=cli_env())
    assert ok.returncode == 0 and ok.stdout.startswith("ok: 1 job, 1 dataset, ")


def test_status_of_an_unknown_job_prints_only_the_error(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    write_dataset(tmp_path / "data/a.jsonl")
    manifest = write_manifest(tmp_path / "m.yaml", [{"name": "a", "dataset": "data/a.jsonl"}])
    state = tmp_path / "s.db"
    env = cli_env(sim)
    run = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    assert run.returncode == 0 and run.stdout.startswith("1 job: 1 succeeded"), run.stdout
    out = run_cli("status", "nope", "--state", str(state), env=env)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == f"error: no such job in {state}: nope"
    nothing = run_cli("cancel", "--all", "--state", str(state), env=env)
    assert nothing.returncode == 0
    assert nothing.stdout.strip() == "nothing to cancel: every job has ended"


def test_cancel_finds_the_key_in_the_manifest_the_job_came_from(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.simulator.config.update({"training_seconds": 60.0})
    write_dataset(tmp_path / "data/a.jsonl")
    key = sim.simulator.config.api_key
    manifest = write_manifest(
        tmp_path / "m.yaml",
        [{"name": "a", "dataset": "data/a.jsonl"}],
        gateway={"base_url": sim.url, "api_key": key},
    )
    state = tmp_path / "s.db"
    env = cli_env()  # no PORTKEY_* at all: the manifest says where and with which key
    run = run_cli("run", str(manifest), "--state", str(state), "--until", "submitted", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run_cli("cancel", "a", "--state", str(state), env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "a: cancelled"
    assert len(sim.journal.cancels) == 1 and key not in out.stdout + out.stderr


def test_the_readme_s3_key_example_runs_against_the_simulator(tmp_path: Path) -> None:
    source = write_dataset(tmp_path / "legal.jsonl", salt="legal")
    sim = subprocess.Popen(
        cli_args(
            "sim",
            "--port",
            "0",
            "--preload",
            f"datasets/legal.jsonl={source}",
            "--validation-seconds",
            "0.2",
            "--training-seconds",
            "0.2",
            "--queue-seconds",
            "0",
            "--access-log",
        ),
        env=cli_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sim.stdout is not None
        url = sim.stdout.readline().strip().rsplit(" ", 1)[-1]
        manifest = write_manifest(
            tmp_path / "m.yaml",
            [
                {
                    "name": "legal-v2",
                    "s3_key": "datasets/legal.jsonl",
                    "provider": "bedrock",
                    "model": "amazon.titan-text-lite-v1",
                    "override_model": "amazon.titan-text-lite-v1:0:4k",
                }
            ],
        )
        env = cli_env(PORTKEY_BASE_URL=url, PORTKEY_API_KEY="sim-secret-key")
        state = tmp_path / "s.db"
        run = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        job = status_of(state, env)["legal-v2"]
        assert job["fine_tuned_model"].startswith("ft:amazon.titan-text-lite-v1:0:4k:legal-v2")
    finally:
        sim.terminate()
        log, _ = sim.communicate(timeout=20)
    # --access-log: a line per request, method, path and status.
    lines = [line for line in log.splitlines() if '"' in line]
    assert any('"POST /v1/finetune HTTP/1.1" 200' in line for line in lines), log
    assert any('"GET /v1/finetune/' in line for line in lines)


def test_a_name_taken_by_another_manifest_is_left_alone_and_follows_a_moved_manifest(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    write_dataset(tmp_path / "data/a.jsonl")
    write_dataset(tmp_path / "data/b.jsonl", salt="b")
    first = write_manifest(tmp_path / "first.yaml", [{"name": "a", "dataset": "data/a.jsonl"}])
    second = write_manifest(
        tmp_path / "second.yaml",
        [{"name": "a", "dataset": "data/b.jsonl"}, {"name": "b", "dataset": "data/b.jsonl"}],
    )
    state = tmp_path / "s.db"
    env = cli_env(sim)
    assert run_cli("run", str(first), "--state", str(state), *FAST_POLL, env=env).returncode == 0
    plan = run_cli("plan", str(second), "--state", str(state), env=env)
    assert f"conflict  the name is taken by a job of {first}; left alone" in plan.stdout
    out = run_cli("run", str(second), "--state", str(state), *FAST_POLL, env=env)
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"a: the name is taken by a job of {first}; left alone" in out.stdout
    jobs = status_of(state, env)
    assert jobs["a"]["manifest"] == str(first) and jobs["b"]["state"] == "succeeded"
    assert sim.journal.finetune_creates["a"] == 1
    # The first manifest is gone (moved, deleted): its jobs follow the one that names them.
    first.unlink()
    plan = run_cli("plan", str(second), "--state", str(state), env=env)
    assert "a    changed" in plan.stdout or "changed since it was submitted" in plan.stdout


def test_the_demo_runs_to_its_end(tmp_path: Path) -> None:
    """The README's first command, as a newcomer runs it."""
    out = run_cli("demo", env=cli_env(), cwd=tmp_path, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("6 jobs: 2 failed, 4 succeeded") for line in lines), out.stdout
    table = [line.split()[:2] for line in lines if line.split()[:1] and "-v" in line.split()[0]]
    assert ["legal-v2", "succeeded"] in table and ["broken-v1", "failed"] in table
    assert "two jobs fail on purpose" in out.stdout


def test_a_base_url_ending_in_v1_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    write_dataset(tmp_path / "data/a.jsonl")
    manifest = write_manifest(tmp_path / "m.yaml", [{"name": "a", "dataset": "data/a.jsonl"}])
    env = cli_env(PORTKEY_BASE_URL="http://127.0.0.1:9/v1", PORTKEY_API_KEY="k-12345")
    out = run_cli("run", str(manifest), "--state", str(tmp_path / "s.db"), env=env)
    assert out.returncode == 2
    assert "must not end in /v1: the calls add it (use http://127.0.0.1:9)" in out.stderr
    assert not (tmp_path / "s.db").exists()


def test_a_simulator_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_cli("sim", "--port", str(port), env=cli_env())
    assert out.returncode == 2
    assert out.stderr.strip().startswith(f"error: cannot listen on 127.0.0.1:{port}: ")


def test_a_renamed_manifest_takes_its_jobs_along_untouched(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    write_dataset(tmp_path / "data/a.jsonl")
    first = write_manifest(tmp_path / "first.yaml", [{"name": "a", "dataset": "data/a.jsonl"}])
    state = tmp_path / "s.db"
    env = cli_env(sim)
    assert run_cli("run", str(first), "--state", str(state), *FAST_POLL, env=env).returncode == 0
    before = status_of(state, env)["a"]
    renamed = first.rename(tmp_path / "renamed.yaml")
    again = run_cli("run", str(renamed), "--state", str(state), *FAST_POLL, env=env)
    assert again.returncode == 0 and again.stdout.startswith("1 job: 1 succeeded")
    after = status_of(state, env)["a"]
    assert after["manifest"] == str(renamed) and before["manifest"] == str(first)
    assert after["updated_at"] == before["updated_at"]  # its finish time stays
    assert sim.journal.finetune_creates["a"] == 1 and sum(sim.journal.starts.values()) == 1
