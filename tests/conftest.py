"""Shared fixtures: a real simulator on a real socket, fast timings, a fresh state file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.simulator import SimConfig, SimulatorThread

FAST = dict(validation_seconds=0.3, queue_seconds=0.1, training_seconds=0.3)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


POSTGRES = os.environ.get("ORCHESTRATOR_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The test server's URL; outside CI a server that does not answer skips the test
    (saying so), under CI=true it fails it."""
    import urllib.parse

    parts = urllib.parse.urlsplit(POSTGRES)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 3).close()
    except OSError as exc:
        where = f"{parts.hostname}:{parts.port}"
        message = f"no PostgreSQL at {where} ({exc}); set ORCHESTRATOR_TEST_POSTGRES"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return POSTGRES


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A database URL of the test's own: a fresh schema, dropped afterwards."""
    import asyncio
    import uuid

    import asyncpg

    schema = f"test_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in postgres_server else "?"
    yield f"{postgres_server}{sep}schema={schema}"
    if os.environ.get("ORCHESTRATOR_TEST_KEEP_SCHEMA"):  # to look into a failure
        print(f"kept schema {schema}")
        return

    async def drop() -> None:
        conn = await asyncpg.connect(postgres_server)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture
def sim_config() -> SimConfig:
    return SimConfig(seed=1, **FAST)


@pytest.fixture
def sim(sim_config: SimConfig) -> Iterator[SimulatorThread]:
    simulator = SimulatorThread(sim_config)
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()


def example_line(i: int, extra: str = "") -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": f"question {i} {extra}"},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        }
    )


def write_dataset(path: Path, examples: int = 12, salt: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(example_line(i, salt) + "\n" for i in range(examples)), "utf-8")
    return path


def write_manifest(path: Path, jobs: list[dict[str, Any]], **top: Any) -> Path:
    import yaml

    document = {
        "defaults": {
            "provider": "openai",
            "model": "gpt-4o-mini",
            "virtual_key": "vk-test",
            "hyperparameters": {"epochs": 1},
        },
        **top,
        "jobs": jobs,
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False), "utf-8")
    return path


def cli_env(sim: SimulatorThread | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTKEY_")}
    if sim is not None:
        env["PORTKEY_BASE_URL"] = sim.url
        env["PORTKEY_API_KEY"] = sim.simulator.config.api_key
    env.update(extra)
    return env


FAST_POLL = ("--poll-interval", "0.05", "--poll-max", "0.2")


def cli_args(*args: str) -> list[str]:
    """The command line of `python -m orchestrator ARGS`, for Popen."""
    return [sys.executable, "-m", "orchestrator", *args]


def start_cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """`orchestrator ARGS` in the background, its output captured as text."""
    return subprocess.Popen(
        cli_args(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run_cli(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_args(*args),
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def status_of(state: Path, env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """`orchestrator status --json`, by job name."""
    out = run_cli("status", "--json", "--state", str(state), env=env or cli_env())
    assert out.returncode == 0, out.stderr
    return {job["name"]: job for job in json.loads(out.stdout)}


def run_measured(*args: str, env: dict[str, str], timeout: float = 300) -> tuple[int, int]:
    """Run the CLI in a child of a small wrapper; return (exit code, child's peak RSS in KiB)."""
    wrapper = (
        "import resource, subprocess, sys\n"
        "code = subprocess.run([sys.executable, '-m', 'orchestrator', *sys.argv[1:]],"
        " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode\n"
        "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    code, rss = out.stdout.split()
    return int(code), int(rss)


def write_big_dataset(path: Path, megabytes: int) -> Path:
    """A valid chat JSONL file of about ``megabytes`` MB, written fast."""
    line = (example_line(0, "z" * 900) + "\n").encode()
    block = line * (4 * 1024 * 1024 // len(line))
    with path.open("wb") as handle:
        for _ in range(megabytes * 1024 * 1024 // len(block)):
            handle.write(block)
    return path


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, bytes]:
    """One plain HTTP request from a test: (status, body), whatever the status."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
