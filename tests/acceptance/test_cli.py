"""plan, cancel, status and the gateway's bad-input cases, as a user runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.simulator import SimulatorThread
from tests.conftest import (
    FAST_POLL,
    cli_args,
    cli_env,
    http,
    run_cli,
    status_of,
    write_dataset,
    write_manifest,
)


def states(state: Path, env: dict[str, str]) -> dict[str, str]:
    return {name: job["state"] for name, job in status_of(state, env).items()}


def plan_actions(manifest: Path, state: Path, env: dict[str, str], *extra: str) -> dict[str, str]:
    out = run_cli("plan", str(manifest), "--state", str(state), *extra, env=env)
    assert out.returncode == 0, out.stderr
    rows = [line.split(None, 2) for line in out.stdout.splitlines()[1:]]
    return {row[0]: row[1] for row in rows}


def test_plan_shows_create_unchanged_changed_retry_without_network(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    write_dataset(tmp_path / "data/a.jsonl", salt="a")
    write_dataset(tmp_path / "data/b.jsonl", salt="b")
    (tmp_path / "data/bad.jsonl").write_text("{oops\n")
    jobs = [
        {"name": "a", "dataset": "data/a.jsonl"},
        {"name": "b", "dataset": "data/b.jsonl"},
        {"name": "bad", "dataset": "data/bad.jsonl"},
    ]
    manifest = write_manifest(tmp_path / "m.yaml", jobs)
    state = tmp_path / "state.db"
    env = cli_env(sim)
    assert plan_actions(manifest, state, env) == {"a": "create", "b": "create", "bad": "invalid"}
    assert not state.exists()  # plan stores nothing
    assert run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env).returncode == 1
    requests = sim.journal.as_json()["requests"]
    jobs[0]["hyperparameters"] = {"epochs": 4}
    write_manifest(tmp_path / "m.yaml", jobs)
    assert plan_actions(manifest, state, env) == {
        "a": "changed",
        "b": "unchanged",
        "bad": "unchanged",
    }
    assert plan_actions(manifest, state, env, "--replace", "a")["a"] == "replace"
    write_dataset(tmp_path / "data/b.jsonl", salt="b2")  # new content: b changed
    assert plan_actions(manifest, state, env)["b"] == "changed"
    (tmp_path / "data/bad.jsonl").write_text("")  # still invalid
    assert plan_actions(manifest, state, env)["bad"] == "invalid"
    assert sim.journal.as_json()["requests"] == requests

    # run leaves changed jobs alone, says so, and exits 1; --replace re-runs them.
    out = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    assert out.returncode == 1 and "a: changed since it was submitted" in out.stdout
    out = run_cli(
        "run",
        str(manifest),
        "--state",
        str(state),
        "--replace",
        "a",
        "--replace",
        "b",
        *FAST_POLL,
        env=env,
    )
    assert states(state, env) == {"a": "succeeded", "b": "succeeded", "bad": "failed"}
    assert sim.journal.finetune_creates["a"] == 2 and sim.journal.finetune_creates["b"] == 2


def test_cancel_beside_a_running_engine(sim: SimulatorThread, tmp_path: Path) -> None:
    sim.simulator.config.update({"training_seconds": 30})
    for name in ("a", "b"):
        write_dataset(tmp_path / f"data/{name}.jsonl", salt=name)
    manifest = write_manifest(
        tmp_path / "m.yaml",
        [{"name": "a", "dataset": "data/a.jsonl"}, {"name": "b", "dataset": "data/b.jsonl"}],
    )
    state = tmp_path / "state.db"
    env = cli_env(sim)
    runner = subprocess.Popen(
        cli_args("run", str(manifest), "--state", str(state), *FAST_POLL),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while sum(sim.journal.starts.values()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        second = run_cli("run", str(manifest), "--state", str(state), env=env)
        assert second.returncode == 2 and "in use by pid" in second.stderr
        out = run_cli("cancel", "--all", "--state", str(state), env=env)
        assert out.returncode == 0, out.stderr
        assert "a: cancelled" in out.stdout and "b: cancelled" in out.stdout
        _, stderr = runner.communicate(timeout=30)
    finally:
        runner.kill()
    assert runner.returncode == 1, stderr[-2000:]
    assert states(state, env) == {"a": "cancelled", "b": "cancelled"}
    assert len(sim.journal.cancels) == 2
    again = run_cli("cancel", "a", "--state", str(state), env=env)
    assert again.returncode == 0 and "a: already cancelled; nothing to cancel" in again.stdout
    unknown = run_cli("cancel", "zzz", "--state", str(state), env=env)
    assert unknown.returncode == 2 and unknown.stderr.strip() == (
        f"error: no such job in {state}: zzz"
    )


def test_cancel_without_engine_and_before_any_finetune(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.simulator.config.update({"latency": 3.0})  # every gateway call is slow
    write_dataset(tmp_path / "data/a.jsonl")
    manifest = write_manifest(tmp_path / "m.yaml", [{"name": "a", "dataset": "data/a.jsonl"}])
    state = tmp_path / "state.db"
    env = cli_env(sim)
    runner = subprocess.Popen(
        cli_args("run", str(manifest), "--state", str(state)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (state.exists() and "a" in states(state, env)):
        time.sleep(0.1)
    time.sleep(0.5)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    no_key = cli_env()  # no API key needed: there is no finetune to cancel remotely
    out = run_cli("cancel", "a", "--state", str(state), env=no_key)
    assert out.returncode == 0, out.stderr
    assert states(state, env) == {"a": "cancelled"}
    rerun = run_cli("run", str(manifest), "--state", str(state), env=env)
    assert rerun.returncode == 1 and "1 cancelled" in rerun.stdout  # cancelled stays cancelled


@pytest.mark.parametrize("case", ["refused", "wrong_key", "bad_url", "not_a_gateway"])
def test_bad_gateway_is_one_line_and_exit_2(
    sim: SimulatorThread, tmp_path: Path, case: str
) -> None:
    write_dataset(tmp_path / "data/a.jsonl")
    manifest = write_manifest(tmp_path / "m.yaml", [{"name": "a", "dataset": "data/a.jsonl"}])
    env = cli_env(sim)
    if case == "refused":
        env["PORTKEY_BASE_URL"] = "http://127.0.0.1:9"
    elif case == "wrong_key":
        env["PORTKEY_API_KEY"] = "wrong-secret-key-42"
    elif case == "bad_url":
        env["PORTKEY_BASE_URL"] = "http://256.1.1.1:80"
    else:  # an HTTP server that is not the gateway: the simulator's own test route
        env["PORTKEY_BASE_URL"] = f"{sim.url}/_sim/journal/"
    out = run_cli("run", str(manifest), "--state", str(tmp_path / "s.db"), env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr and "wrong-secret-key-42" not in out.stderr
    expected = {
        "refused": "gateway http://127.0.0.1:9: cannot connect to 127.0.0.1:9: connection refused",
        "wrong_key": f"gateway {sim.url} refused the API key (HTTP 401)",
        "bad_url": "PORTKEY_BASE_URL: is not a valid URL",
        "not_a_gateway": "without the gateway's {success, data} envelope",
    }[case]
    assert expected in lines[0]
    assert sim.journal.dataset_creates == {}
    assert not (tmp_path / "s.db").exists()  # nothing stored


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sim_stops_on_a_signal_and_removes_its_uploads(tmp_path: Path, signum: int) -> None:
    data = tmp_path / "tmp"
    data.mkdir()
    process = subprocess.Popen(
        cli_args("sim", "--port", "0", "--api-key", "sim-key-1234"),
        env=cli_env(TMPDIR=str(data)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    url = process.stdout.readline().strip().rsplit(" ", 1)[-1]
    assert url.startswith("http://127.0.0.1:")
    body = {"name": "d.jsonl", "provider": "openai", "model": "m", "type": "training"}
    _, answer = http(
        "POST",
        f"{url}/v1/datasets",
        json.dumps(body).encode(),
        {"x-portkey-api-key": "sim-key-1234", "Content-Type": "application/json"},
    )
    created = json.loads(answer)["data"]
    assert http("PUT", created["signed_url"], b"x" * 4096)[0] == 200
    assert [p.name[:13] for p in data.iterdir()] == ["finetune-sim-"]  # holds the upload
    process.send_signal(signum)
    assert process.wait(timeout=20) == 0
    assert list(data.iterdir()) == []


def test_json_logs_show_milestones_and_verbose_shows_every_transition(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    data = write_dataset(tmp_path / "d.jsonl")
    logged: dict[bool, list[str]] = {}
    for verbose in (False, True):
        manifest = write_manifest(
            tmp_path / f"m{verbose}.yaml",
            [{"name": f"job-{verbose}".lower(), "dataset": str(data)}],
        )
        out = run_cli(
            "run",
            str(manifest),
            "--state",
            str(tmp_path / f"s{verbose}.db"),
            "--no-live",
            *FAST_POLL,
            *(["--verbose"] if verbose else []),
            env=cli_env(sim),
        )
        assert out.returncode == 0, out.stderr
        lines = [json.loads(line) for line in out.stderr.splitlines()]
        logged[verbose] = [line["state"] for line in lines if line["event"] == "transition"]
        assert any(line["event"] == "uploaded" for line in lines)
    assert logged[False] == ["validating", "training", "succeeded"]
    assert logged[True] == [
        "dataset_created",
        "uploaded",
        "dataset_ready",
        "finetune_created",
        "dataset_attached",
        "validating",
        "validated",
        "training",
        "succeeded",
    ]
