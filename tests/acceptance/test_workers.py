"""Several workers on one PostgreSQL database share the jobs of one manifest: each job
has one driver at a time, a killed worker's jobs are taken over, and a paused worker
that lost its leases neither writes nor calls the gateway for them again."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from orchestrator.simulator import SimulatorThread
from tests.acceptance.test_evidence import assert_invariants
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

LEASE_TTL = 3.0


def query(url: str, sql: str, *args: Any) -> list[Any]:
    """Rows of ``sql`` in the test's schema."""
    base, schema = url.split("?schema=")

    async def go() -> list[Any]:
        conn = await asyncpg.connect(base, server_settings={"search_path": schema})
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def worker_of(process: subprocess.Popen[str]) -> str:
    return f"%:{process.pid}:%"


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return time.monotonic()


def leased_by(url: str, process: subprocess.Popen[str]) -> set[str]:
    rows = query(url, "SELECT name FROM jobs WHERE lease_owner LIKE $1", worker_of(process))
    return {r[0] for r in rows}


def start_worker(args: tuple[str, ...], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    """A worker whose log goes to a file: hundreds of jobs log more than a pipe holds."""
    with log.open("w") as sink:
        return subprocess.Popen(cli_args(*args), env=env, stdout=sink, stderr=sink, text=True)


def stop_all(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.mark.slow
def test_three_workers_share_300_jobs_and_survive_a_sigkill(
    sim: SimulatorThread, tmp_path: Path, postgres_url: str
) -> None:
    sim.simulator.config.update({"max_example_chars": 5000})
    manifest, expected = mixed_manifest(tmp_path, sim, 300)
    sim.simulator.config.update(
        {
            "validation_seconds": 1.0,
            "training_seconds": 2.5,
            "error_rate": 0.05,
            "lost_response_rate": 0.02,
            "latency": 0.002,
            "latency_jitter": 0.01,
        }
    )
    env = cli_env(sim)
    migrated = run_cli("migrate", "--state", postgres_url, env=env)
    assert migrated.returncode == 0 and "schema version none -> 1" in migrated.stdout
    args = ("run", str(manifest), "--state", postgres_url, "--lease-ttl", str(LEASE_TTL))
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    workers = [start_worker((*args, *FAST_POLL, "--no-live"), env, log) for log in logs]
    try:
        # The victim: whichever worker first drives ten jobs at once, killed right then.
        chosen: list[subprocess.Popen[str]] = []

        def one_holds_ten() -> bool:
            chosen[:] = [w for w in workers if len(leased_by(postgres_url, w)) >= 10][:1]
            return bool(chosen)

        wait_for(one_holds_ten, "a worker to hold ten leases")
        victim = chosen[0]
        survivors = [w for w in workers if w is not victim]
        held = leased_by(postgres_url, victim)
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        taken = wait_for(
            lambda: not leased_by(postgres_url, victim), "its jobs to be taken over", 60
        )
        assert taken - killed <= LEASE_TTL + 4
        for survivor in survivors:
            log = logs[workers.index(survivor)]
            survivor.wait(timeout=240)
            assert survivor.returncode == 1, log.read_text()[-3000:]  # some fail on purpose
    finally:
        stop_all(workers)
    jobs = status_of(postgres_url, env)  # type: ignore[arg-type]
    assert_invariants(sim, jobs, expected)
    # The survivors ended every job the victim held when it died.
    ends = query(
        postgres_url,
        "SELECT DISTINCT split_part(worker, ':', 2)::int FROM transitions "
        "WHERE name = ANY($1::text[]) AND new_state IN ('succeeded', 'failed')",
        sorted(held),
    )
    assert {r[0] for r in ends} <= {w.pid for w in survivors} and ends
    assert sim.journal.faults["lost_response"] > 0


class CountingProxy:
    """A TCP forwarder in front of the simulator that timestamps every chunk a client
    sends: the witness of which calls a worker made, and when."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.sent_at: list[float] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: bool) -> None:
            try:
                while chunk := await src.read(65536):
                    if count:
                        self.sent_at.append(time.monotonic())
                    dst.write(chunk)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))


@pytest.fixture
def sim_address(sim: SimulatorThread) -> Iterator[tuple[str, int]]:
    host, port = sim.url.removeprefix("http://").split(":")
    yield host, int(port)


def test_a_paused_worker_that_lost_its_leases_writes_and_calls_nothing(
    sim: SimulatorThread, sim_address: tuple[str, int], tmp_path: Path, postgres_url: str
) -> None:
    sim.simulator.config.update({"validation_seconds": 1.0, "training_seconds": 12.0})
    jobs = [{"name": f"p-{i}", "s3_key": f"datasets/p-{i}.jsonl"} for i in range(6)]
    source = write_dataset(tmp_path / "p.jsonl")
    for job in jobs:
        sim.call(lambda k=job["s3_key"]: sim.simulator.preload(k, source))
    manifest = write_manifest(tmp_path / "m.yaml", jobs)
    args = ("run", str(manifest), "--state", postgres_url, "--lease-ttl", "2", "--no-live")
    assert run_cli("migrate", "--state", postgres_url, env=cli_env()).returncode == 0
    with CountingProxy(sim_address) as proxy:
        paused_env = cli_env(sim, PORTKEY_BASE_URL=f"http://127.0.0.1:{proxy.port}")
        paused_log, other_log = tmp_path / "paused.log", tmp_path / "other.log"
        paused = start_worker((*args, *FAST_POLL), paused_env, paused_log)
        other: subprocess.Popen[str] | None = None
        try:
            wait_for(lambda: len(sim.journal.starts) == len(jobs), "every training to start", 60)
            lost = leased_by(postgres_url, paused)
            assert lost == {job["name"] for job in jobs}
            paused.send_signal(signal.SIGSTOP)
            other = start_worker((*args, *FAST_POLL), cli_env(sim), other_log)
            # Taken over: no job is the paused worker's any more (claimed by the other,
            # which may also have ended some already).
            wait_for(lambda: not leased_by(postgres_url, paused), "the takeover")
            # The shared view: each job in flight with the worker that drives it now.
            shown = status_of(postgres_url, cli_env())  # type: ignore[arg-type]
            drivers = {j["worker"].split(":")[1] for j in shown.values() if "worker" in j}
            assert drivers == {str(other.pid)}
            table = run_cli("status", "--state", postgres_url, env=cli_env()).stdout
            assert "worker (lease)" in table and f":{other.pid}:" in table
            resumed, resumed_wall = time.monotonic(), time.time()
            paused.send_signal(signal.SIGCONT)
            assert other.wait(timeout=120) == 0, other_log.read_text()[-3000:]
            assert paused.wait(timeout=60) == 0, paused_log.read_text()[-3000:]
            paused_err = paused_log.read_text()
        finally:
            stop_all([p for p in (paused, other) if p is not None])
        calls_after = [t for t in proxy.sent_at if t > resumed]
    assert calls_after == []  # not one gateway call for the jobs it lost
    assert "another worker took this job over" in paused_err
    written = query(
        postgres_url,
        "SELECT name, new_state FROM transitions WHERE worker LIKE $1 AND at >= $2",
        worker_of(paused),
        resumed_wall,
    )
    assert written == []  # fenced: every later transition is the other worker's
    states = status_of(postgres_url, cli_env())  # type: ignore[arg-type]
    assert {j["state"] for j in states.values()} == {"succeeded"}
    assert all(n == 1 for n in sim.journal.finetune_creates.values())
    assert all(n == 1 for n in sim.journal.starts.values())


def test_a_database_password_is_never_shown_and_a_bad_url_is_one_line(
    tmp_path: Path, postgres_url: str
) -> None:
    # Nothing listens on port 1: the error names the database without its password.
    unreachable = "postgresql://postgres:hunter2secret@127.0.0.1:1/test?sslpassword=p4ss"
    out = run_cli("status", "--state", unreachable, env=cli_env())
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "cannot connect" in out.stderr
    assert "hunter2secret" not in out.stderr + out.stdout and "p4ss" not in out.stderr
    # A password from a file: used (trust auth takes any), never printed.
    secret = tmp_path / "pgpass"
    secret.write_text("s3cr3t-from-file\n")
    args = ("--state", postgres_url, "--state-password-file", str(secret))
    migrated = run_cli("migrate", *args, env=cli_env())
    assert migrated.returncode == 0 and "-> 1" in migrated.stdout, migrated.stderr
    assert "s3cr3t" not in migrated.stdout + migrated.stderr
    missing = run_cli(
        "status", "--state", postgres_url, "--state-password-file", "/nope", env=cli_env()
    )
    assert missing.returncode == 2 and "/nope: cannot read" in missing.stderr
