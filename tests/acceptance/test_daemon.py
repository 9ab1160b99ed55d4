"""The daemon as a subprocess beside the simulator: watch, edit, SIGTERM, restart."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.simulator import SimConfig, SimulatorThread
from tests.conftest import (
    FAST,
    cli_args,
    cli_env,
    http,
    run_cli,
    status_of,
    write_dataset,
    write_manifest,
)

SECRET = "sk-daemon-secret-4f9a1c"


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(seed=3, api_key=SECRET, **{**FAST, "training_seconds": 3.0})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class DaemonProcess:
    def __init__(
        self, folder: Path, sim: SimulatorThread, log: Path, extra: list[str] | None = None
    ) -> None:
        self.folder, self.sim, self.log = folder, sim, log
        self.extra = extra or []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> subprocess.Popen[str]:
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                cli_args(
                    "daemon",
                    "--watch",
                    str(self.folder / "watch"),
                    "--state",
                    str(self.folder / "state.db"),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--rescan",
                    "0.5",
                    "--poll-interval",
                    "0.05",
                    "--poll-max",
                    "0.2",
                    *self.extra,
                ),
                env=cli_env(self.sim),
                stdout=log,
                stderr=log,
                text=True,
            )
        wait_for(lambda: self._healthy(), "daemon to answer /healthz")
        return self.process

    def _healthy(self) -> bool:
        try:
            return http("GET", f"{self.url}/healthz", timeout=1)[0] == 200
        except OSError:
            return False

    def jobs(self) -> list[dict[str, Any]]:
        status, body = http("GET", f"{self.url}/jobs")
        assert status == 200, body
        jobs: list[dict[str, Any]] = json.loads(body)
        return jobs

    def states(self) -> dict[str, str]:
        return {j["name"]: j["state"] for j in self.jobs()}

    def terminate(self) -> tuple[int, float]:
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        return code, time.monotonic() - started


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def daemon(tmp_path: Path, sim: SimulatorThread) -> Iterator[DaemonProcess]:
    (tmp_path / "watch").mkdir()
    process = DaemonProcess(tmp_path, sim, tmp_path / "daemon.log")
    yield process
    if process.process is not None and process.process.poll() is None:
        process.process.kill()
        process.process.wait()


def manifest_jobs(tmp_path: Path, names: list[str]) -> list[dict[str, str]]:
    for name in names:
        write_dataset(tmp_path / f"data/{name}.jsonl", salt=name)
    return [{"name": n, "dataset": str(tmp_path / f"data/{n}.jsonl")} for n in names]


def drop(path: Path, jobs: list[dict[str, str]]) -> None:
    """Write next to the folder, then rename in: the daemon never sees half a file."""
    staging = path.parent.parent / f".{path.name}.tmp"
    write_manifest(staging, jobs)
    staging.replace(path)


@pytest.mark.slow
def test_watch_edit_sigterm_restart_exactly_one_start(
    daemon: DaemonProcess, sim: SimulatorThread, tmp_path: Path
) -> None:
    daemon.start()
    watched = tmp_path / "watch/team.yaml"
    jobs = manifest_jobs(tmp_path, [f"d-{i}" for i in range(8)])
    drop(watched, jobs)
    # SIGTERM in the middle: some jobs are training, none has finished.
    wait_for(lambda: sum(sim.journal.starts.values()) >= 3, "training to start")
    code, seconds = daemon.terminate()
    assert code == 0 and seconds < 12
    interrupted = {j["name"]: j["state"] for j in status_of(tmp_path / "state.db").values()}
    assert len(interrupted) == 8 and "training" in interrupted.values()
    assert "succeeded" not in interrupted.values()

    daemon.start()
    wait_for(
        lambda: set(daemon.states().values()) == {"succeeded"} and len(daemon.states()) == 8,
        "the first eight jobs",
    )
    drop(watched, [*jobs, *manifest_jobs(tmp_path, ["d-new"])])
    wait_for(lambda: daemon.states().get("d-new") == "succeeded", "the added job")
    code, _ = daemon.terminate()
    assert code == 0
    journal = sim.journal
    finetunes = {j["finetune_id"] for j in status_of(tmp_path / "state.db").values()}
    assert len(finetunes) == 9
    assert all(journal.starts[f] == 1 for f in finetunes) and len(journal.starts) == 9
    assert all(n == 1 for n in journal.finetune_creates.values())

    # Nothing of the API key in any log line or in the state file.
    assert SECRET not in (tmp_path / "daemon.log").read_text()
    for path in tmp_path.glob("state.db*"):
        assert SECRET.encode() not in path.read_bytes()
    log_lines = [
        json.loads(line)
        for line in (tmp_path / "daemon.log").read_text().splitlines()
        if line.startswith("{")
    ]
    job_events = [e for e in log_lines if e.get("job")]
    assert job_events and all(
        {"job", "state", "dataset_id", "finetune_id", "timestamp"} <= set(e) for e in job_events
    )
    assert all(e["timestamp"].endswith("Z") for e in log_lines)


def test_metrics_bad_manifests_second_daemon_and_cancel(
    daemon: DaemonProcess, sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.simulator.config.update({"training_seconds": 60})
    daemon.start()
    (tmp_path / "watch/broken.yaml").write_text("jobs: [unclosed\n")
    drop(tmp_path / "watch/good.yml", manifest_jobs(tmp_path, ["m-1", "m-2"]))
    wait_for(
        lambda: (
            daemon.states().get("m-1") == "training" and daemon.states().get("m-2") == "training"
        ),
        "training",
    )
    jobs = daemon.jobs()
    broken = [j for j in jobs if j["state"] == "manifest_error"]
    assert len(broken) == 1 and "broken.yaml:1: YAML syntax error" in broken[0]["error"]
    assert "manifest skipped" in (tmp_path / "daemon.log").read_text()

    text = http("GET", f"{daemon.url}/metrics")[1].decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    training = [s for s in families["orchestrator_jobs"].samples if s.labels["state"] == "training"]
    assert training[0].value == 2
    assert families["orchestrator_manifest_errors"].samples[0].value == 1  # broken.yaml
    for name in (
        "orchestrator_transitions",
        "orchestrator_gateway_calls",
        "orchestrator_gateway_retries",
        "orchestrator_polls",
        "orchestrator_upload_bytes",
        "orchestrator_upload_seconds",
    ):
        assert name in families
    calls = [
        s
        for s in families["orchestrator_gateway_calls"].samples
        if s.name.endswith("_total") and s.labels["endpoint"] == "start_finetune"
    ]
    assert calls and calls[0].labels["status_class"] == "2xx" and calls[0].value == 2

    second = subprocess.run(
        cli_args(
            "daemon",
            "--watch",
            str(tmp_path / "watch"),
            "--state",
            str(tmp_path / "state.db"),
            "--listen",
            f"127.0.0.1:{free_port()}",
        ),
        env=cli_env(sim),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 2 and "in use by pid" in second.stderr

    # The store is the control plane: cancel from the CLI while the daemon owns the state.
    out = run_cli("cancel", "m-1", "--state", str(tmp_path / "state.db"), env=cli_env(sim))
    assert out.returncode == 0 and "m-1: cancelled" in out.stdout, out.stderr
    wait_for(lambda: daemon.states()["m-1"] == "cancelled", "the cancel to land")
    assert daemon.states()["m-2"] == "training"
    code, _ = daemon.terminate()
    assert code == 0


def test_bad_manifests_never_stop_watching_and_two_sigints_end_cleanly(
    daemon: DaemonProcess, tmp_path: Path, sim: SimulatorThread
) -> None:
    watch = tmp_path / "watch"
    daemon.start()
    (watch / "broken.yaml").write_text("jobs: [\n")  # a YAML error
    (watch / "empty.yaml").write_bytes(b"\xff\xfe not text")
    down = tmp_path / ".down.yaml"  # a gateway that is not there, its URL with a password
    write_manifest(
        down,
        manifest_jobs(tmp_path, ["down-a"]),
        gateway={"base_url": "http://admin:s3cret-pw@127.0.0.1:1"},
    )
    down.replace(watch / "down.yaml")
    drop(watch / "one.yaml", manifest_jobs(tmp_path, ["one-a", "one-b"]))
    wait_for(
        lambda: (
            daemon.states().get("one-b") == "succeeded"
            and daemon.states().get("one-a") == "succeeded"
        ),
        "the good manifest's jobs",
    )
    errors = {j["name"]: j["error"] for j in daemon.jobs() if j["state"] == "manifest_error"}
    assert set(errors) == {"broken.yaml", "empty.yaml", "down.yaml"}
    assert "cannot connect to 127.0.0.1:1" in errors["down.yaml"]
    assert "s3cret-pw" not in json.dumps(daemon.jobs())
    (watch / "broken.yaml").unlink()
    drop(watch / "two.yaml", manifest_jobs(tmp_path, ["two-a"]))
    wait_for(lambda: daemon.states().get("two-a") == "succeeded", "a later manifest's job")
    assert "broken.yaml" not in daemon.states()
    # Work in flight, then Ctrl-C twice: the second cuts the grace period short.
    sim.simulator.config.update({"latency": 0.3})
    drop(watch / "three.yaml", manifest_jobs(tmp_path, [f"three-{i}" for i in range(20)]))
    wait_for(lambda: sim.journal.dataset_creates["three-0.jsonl"] > 0, "work in flight")
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGINT)
    time.sleep(0.1)
    daemon.process.send_signal(signal.SIGINT)
    assert daemon.process.wait(timeout=30) == 0
    log = daemon.log.read_text()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    assert "s3cret-pw" not in log
    assert all(n == 1 for n in sim.journal.finetune_creates.values())
