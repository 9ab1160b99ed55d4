"""Notifications: every job's end reaches a receiver at least once, signed, also when
the receiver was down or the sender was SIGKILLed between the transition and the
delivery."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from orchestrator.simulator import SimulatorThread
from tests.acceptance.test_run import mixed_manifest
from tests.conftest import FAST_POLL, cli_args, cli_env, run_cli, status_of

SECRET = b"notify-secret-9d2f"


class Receiver:
    """A webhook receiver on a real socket: records what arrives, or answers 503."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.down = False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
                if self.headers.get("X-Orchestrator-Signature") != expected:
                    receiver.bad_signatures += 1
                event = json.loads(body)
                assert self.headers.get("X-Orchestrator-Event") == event["event"]
                receiver.events.append(event)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/fine-tunes"

    def endings(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for event in self.events:
            if event["event"] in ("job.succeeded", "job.failed", "job.cancelled"):
                out.setdefault(event["job"], []).append(event["state"])
        return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    receiver.server.shutdown()


def notify_env(sim: SimulatorThread, tmp_path: Path) -> dict[str, str]:
    return cli_env(sim, ORCHESTRATOR_NOTIFY_SECRET=SECRET.decode())


def test_every_ending_and_milestone_is_notified_once_and_signed(
    sim: SimulatorThread, tmp_path: Path, receiver: Receiver
) -> None:
    sim.simulator.config.update({"max_example_chars": 5000})
    manifest, expected = mixed_manifest(tmp_path, sim, 10)
    state = tmp_path / "s.db"
    env = notify_env(sim, tmp_path)
    out = run_cli(
        "run",
        str(manifest),
        "--state",
        str(state),
        "--notify",
        receiver.url,
        "--notify-milestones",
        *FAST_POLL,
        env=env,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    assert receiver.bad_signatures == 0
    assert receiver.endings() == {name: [state] for name, state in expected.items()}
    trained = [e["job"] for e in receiver.events if e["event"] == "job.training"]
    assert sorted(trained) == sorted(n for n, s in expected.items() if s == "succeeded")
    assert len({e["id"] for e in receiver.events}) == len(receiver.events)
    won = next(e for e in receiver.events if e["event"] == "job.succeeded")
    assert won["fine_tuned_model"].startswith("ft:") and won["manifest"] == str(manifest)
    assert "notification" not in run_cli("status", "--state", str(state), env=env).stdout


def test_no_secret_no_notifications_and_a_clear_line(
    sim: SimulatorThread, tmp_path: Path, receiver: Receiver
) -> None:
    manifest, _ = mixed_manifest(tmp_path, sim, 1)
    out = run_cli(
        "run",
        str(manifest),
        "--state",
        str(tmp_path / "s.db"),
        "--notify",
        receiver.url,
        env=cli_env(sim),
    )
    assert out.returncode == 2
    assert "notifications need a secret to sign them" in out.stderr


@pytest.mark.slow
def test_events_outlive_a_receiver_that_is_down_and_a_kill(
    sim: SimulatorThread, tmp_path: Path, receiver: Receiver
) -> None:
    sim.simulator.config.update({"max_example_chars": 5000, "training_seconds": 1.0})
    manifest, expected = mixed_manifest(tmp_path, sim, 20)
    state = tmp_path / "s.db"
    env = notify_env(sim, tmp_path)
    args = ("run", str(manifest), "--state", str(state), "--notify", receiver.url, *FAST_POLL)
    receiver.down = True
    process = subprocess.Popen(
        cli_args(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # some jobs ended: their events wait in the outbox
        if (
            state.exists()
            and sum(j["state"] == "succeeded" for j in status_of(state, env).values()) >= 3
        ):
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    table = run_cli("status", "--state", str(state), env=env).stdout
    assert "not delivered yet, to " + receiver.url in table
    assert receiver.events == []
    receiver.down = False
    final = run_cli(*args, env=env)
    assert final.returncode == 1, final.stderr[-2000:]
    assert receiver.bad_signatures == 0
    endings = receiver.endings()
    assert set(endings) == set(expected)  # every ending, at least once
    assert all(set(states) == {expected[name]} for name, states in endings.items())
    assert "not delivered" not in run_cli("status", "--state", str(state), env=env).stdout
