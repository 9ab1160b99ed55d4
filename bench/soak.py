"""A daemon that runs for weeks: waves of small jobs through one daemon, its resident
memory read after each wave. A finished job must leave nothing behind in memory, so the
RSS after the last wave stays within a few percent of the RSS after the first."""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.harness import cli, orchestrator_env, simulator
from bench.lifecycle import _manifest

WAVES = 6
JOBS_PER_WAVE = 500


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _succeeded(url: str) -> int:
    # From /metrics, not /jobs: a list of every job ever run would itself grow the RSS.
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        for line in response.read().decode().splitlines():
            if line.startswith('orchestrator_jobs{state="succeeded"}'):
                return int(float(line.split()[-1]))
    return 0


def _wait(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("soak: timed out")
        time.sleep(0.5)


def run(waves: int = WAVES, jobs: int = JOBS_PER_WAVE) -> dict[str, Any]:
    flags = ("--validation-seconds", "0.2", "--queue-seconds", "0.1", "--training-seconds", "0.3")
    with simulator(*flags) as sim, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        watch = folder / "watch"
        watch.mkdir()
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        daemon = subprocess.Popen(
            cli(
                "daemon",
                "--watch",
                str(watch),
                "--state",
                str(folder / "state.db"),
                "--listen",
                f"127.0.0.1:{port}",
                "--rescan",
                "1",
                "--poll-interval",
                "0.05",
                "--poll-max",
                "0.5",
            ),
            env=orchestrator_env(sim),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(lambda: _answers(url), 60)
            rss: list[float] = []
            for wave in range(waves):
                manifest = _manifest(folder, jobs, prefix=f"wave{wave}")
                manifest.rename(watch / manifest.name)
                done = (wave + 1) * jobs
                _wait(lambda done=done: _succeeded(url) >= done, 600)
                time.sleep(1.0)  # the last drivers return
                rss.append(_rss_mib(daemon.pid))
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
    return {
        "soak_jobs": waves * jobs,
        "soak_rss_mib_first_wave": round(rss[0], 1),
        "soak_rss_mib_last_wave": round(rss[-1], 1),
        "soak_rss_growth": round(rss[-1] / rss[0], 3),
        "soak_rss_mib_by_wave": " ".join(f"{r:.0f}" for r in rss),
    }


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2):
            return True
    except OSError:
        return False
