"""Processes the benchmarks measure: the simulator and `orchestrator` as subprocesses."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

API_KEY = "bench-secret-key"


@dataclass
class SimProcess:
    url: str
    process: subprocess.Popen[str]

    def journal(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/_sim/journal") as response:
            data: dict[str, Any] = json.load(response)
            return data


@contextmanager
def simulator(*flags: str) -> Iterator[SimProcess]:
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "sim", "--port", "0", "--api-key", API_KEY, *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    first = process.stdout.readline().strip()
    url = first.rsplit(" ", 1)[-1]
    try:
        yield SimProcess(url, process)
    finally:
        process.terminate()
        process.wait(timeout=30)


@dataclass
class Measured:
    code: int
    wall: float
    cpu: float  # user + system seconds of the measured process
    peak_rss_mib: float
    stderr: str
    stdout: str = ""


_WRAPPER = """
import resource, subprocess, sys, time, json
started = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": done.returncode, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
                  "rss_kib": usage.ru_maxrss, "stderr": done.stderr[-20000:],
                  "stdout": done.stdout[-20000:]}))
"""


def reference_cpu_s() -> float:
    """CPU seconds of a fixed interpreter workload (dicts, f-strings, JSON). Read beside
    a CPU figure measured at the same moment, it shows how fast the machine was then:
    this machine's speed drifts by 10-30% over an hour."""
    started = time.process_time()
    for i in range(40_000):
        record = {"name": f"job-{i:05d}", "state": "training", "attempt": i, "ids": [i, -i]}
        json.loads(json.dumps(record))
    return time.process_time() - started


def measure(args: list[str], env: dict[str, str] | None = None) -> Measured:
    """Run ``args`` as the only child of a small wrapper, so its rusage is its own."""
    out = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *args], env=env, capture_output=True, text=True, check=True
    )
    data = json.loads(out.stdout)
    return Measured(
        data["code"],
        data["wall"],
        data["cpu"],
        data["rss_kib"] / 1024,
        data["stderr"],
        data["stdout"],
    )


def orchestrator_env(sim: SimProcess) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PORTKEY_BASE_URL=sim.url, PORTKEY_API_KEY=API_KEY)
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args]


def write_file(path: Path, size: int, *, sparse: bool = False) -> Path:
    with path.open("wb") as handle:
        if sparse:
            handle.truncate(size)
            return path
        block = os.urandom(8 << 20)
        written = 0
        while written < size:
            chunk = block[: min(len(block), size - written)]
            handle.write(chunk)
            written += len(chunk)
    return path


def self_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def now() -> float:
    return time.perf_counter()
