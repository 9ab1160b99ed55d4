"""One contract every store backend must pass, plus what only SQLite promises."""

from __future__ import annotations

import sqlite3
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from orchestrator.errors import LeaseLost, StateLockedError, StoreError
from orchestrator.notify import OutboxEvent
from orchestrator.states import JobRecord, State, Transition
from orchestrator.store import (
    SCHEMA_VERSION,
    CheckpointStore,
    MemoryStore,
    OwnerLock,
    SharedDataset,
    SqliteStore,
    StateLocation,
    open_store,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "memory", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[CheckpointStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "postgresql":
        location = StateLocation(request.getfixturevalue("postgres_url"))
    else:
        location = StateLocation(str(tmp_path / "state.db"))
    async with open_store(location) as opened:
        yield opened


async def create(store: CheckpointStore, record: JobRecord, *, claim: bool = True) -> None:
    """A job's first save is its creation; a shared store records it free, and a worker
    claims it before it writes it again."""
    await store.save(record, Transition(record.name, None, record.state, 0.0))
    if claim:
        await store.claim([record.name])


async def test_records_round_trip_with_history(store: CheckpointStore) -> None:
    record = JobRecord(name="a", fingerprint="f1", abandoned_datasets=("ds_1",))
    await store.save(record, Transition("a", None, State.PENDING, 1.0))
    await store.claim(["a"])
    moved = record.evolve(state=State.DATASET_CREATED, dataset_id="ds_2", intent="create_dataset")
    await store.save(moved, Transition("a", State.PENDING, State.DATASET_CREATED, 2.0, "x"))
    await store.save(moved.evolve(poll_attempt=3))  # no transition: history unchanged
    loaded = (await store.load())["a"]
    assert loaded.state is State.DATASET_CREATED and loaded.dataset_id == "ds_2"
    assert loaded.abandoned_datasets == ("ds_1",) and loaded.poll_attempt == 3
    assert [t.new for t in await store.history("a")] == [State.PENDING, State.DATASET_CREATED]
    assert [t.at for t in await store.history("a")] == [1.0, 2.0]
    assert await store.load(["missing"]) == {}


async def test_cancel_requests_and_shared_datasets(store: CheckpointStore) -> None:
    await store.request_cancel(["a", "b"])
    await store.request_cancel(["a"])
    assert await store.cancel_requests() == {"a", "b"}
    await store.clear_cancel("a")
    assert await store.cancel_requests() == {"b"}
    assert await store.find_dataset("k") is None
    record = JobRecord(name="a", fingerprint="f", state=State.DATASET_READY, dataset_id="ds_9")
    await create(store, record.evolve(state=State.PENDING))
    await store.save(record, dataset=SharedDataset("k", "ds_9", "datasets/x.jsonl"))
    assert await store.find_dataset("k") == SharedDataset("k", "ds_9", "datasets/x.jsonl")


async def test_notifications_wait_in_the_outbox_until_delivered(store: CheckpointStore) -> None:
    record = JobRecord(name="a", fingerprint="f", state=State.SUCCEEDED, usage={"records": 3})
    await create(store, record.evolve(state=State.TRAINING))
    events = [OutboxEvent("http://r.test/1", '{"x": 1}'), OutboxEvent("http://r.test/2", "{}")]
    await store.save(record, Transition("a", State.TRAINING, State.SUCCEEDED, 1.0), events=events)
    assert (await store.load())["a"].usage == {"records": 3}
    due = await store.due_events(time.time(), 10)
    assert [(e.url, e.body, e.attempts) for e in due] == [
        ("http://r.test/1", '{"x": 1}', 0),
        ("http://r.test/2", "{}", 0),
    ]
    await store.event_failed(due[0].id, time.time() + 60)
    await store.event_delivered(due[1].id)
    assert await store.due_events(time.time(), 10) == []
    later = await store.due_events(time.time() + 120, 10)
    assert [(e.url, e.attempts) for e in later] == [("http://r.test/1", 1)]
    assert [e.url for e in await store.undelivered()] == ["http://r.test/1"]


async def test_forget_removes_jobs_history_and_cancels(store: CheckpointStore) -> None:
    for name in ("a", "b"):
        record = JobRecord(name=name, fingerprint="f", state=State.FAILED)
        await store.save(record, Transition(name, None, State.FAILED, 1.0))
    await store.request_cancel(["a"])
    await store.forget(["a"])
    assert set(await store.load()) == {"b"}
    assert await store.history("a") == [] and await store.cancel_requests() == set()


async def test_concurrent_saves_share_commits(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "state.db")
    try:
        async with anyio.create_task_group() as tg:
            for i in range(300):
                record = JobRecord(name=f"j{i}", fingerprint="f")
                tg.start_soon(store.save, record, Transition(record.name, None, State.PENDING, 0))
        assert len(await store.load()) == 300
        assert store.commits < 30  # 300 durable saves, a handful of commits
    finally:
        store.close()


async def test_state_file_is_private_wal_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    SqliteStore(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        SqliteStore(path)


async def test_garbage_state_file_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a usable state file"):
        SqliteStore(path)


async def test_a_version_1_state_file_is_migrated_and_keeps_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
        db.execute(
            "INSERT INTO jobs VALUES ('a', 'f', 'training', 'm.yaml', 'http://g', 1, NULL, NULL,"
            " 'ds_1', 'k', NULL, '[\"ds_0\"]', 'ft_1', 'provider_finetune_in_progress', NULL,"
            " NULL, 3, 10.0, 5.0, 1.0, 2.0)"
        )
    store = SqliteStore(path)
    try:
        record = (await store.load())["a"]
        assert (record.state, record.finetune_id, record.abandoned_datasets) == (
            State.TRAINING,
            "ft_1",
            ("ds_0",),
        )
        assert record.abandoned_finetunes == () and record.adoptable is False
        await store.save(record.evolve(abandoned_finetunes=("ft_0",), adoptable=True))
        again = (await store.load())["a"]
        assert again.abandoned_finetunes == ("ft_0",) and again.adoptable is True
    finally:
        store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE jobs (
    name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, state TEXT NOT NULL,
    manifest TEXT NOT NULL, base_url TEXT NOT NULL, attempt INTEGER NOT NULL, intent TEXT,
    content_sha256 TEXT, dataset_id TEXT, s3_key TEXT, upload_md5 TEXT,
    abandoned_datasets TEXT NOT NULL, finetune_id TEXT, remote_status TEXT,
    fine_tuned_model TEXT, error TEXT, poll_attempt INTEGER NOT NULL, next_poll_at REAL,
    phase_started_at REAL, created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE transitions (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL,
    old_state TEXT, new_state TEXT NOT NULL, at REAL NOT NULL, detail TEXT);
CREATE TABLE cancel_requests (name TEXT PRIMARY KEY, requested_at REAL NOT NULL);
CREATE TABLE phase_estimates (key TEXT PRIMARY KEY, seconds REAL NOT NULL);
CREATE TABLE datasets (content_key TEXT PRIMARY KEY, dataset_id TEXT NOT NULL,
    s3_key TEXT NOT NULL, created_at REAL NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
"""


async def test_only_one_owner(tmp_path: Path) -> None:
    first, second = OwnerLock(tmp_path / "s.db"), OwnerLock(tmp_path / "s.db")
    first.acquire()
    assert second.held_by_other()
    with pytest.raises(StateLockedError, match="in use by pid"):
        second.acquire()
    first.release()
    assert not second.held_by_other()
    second.acquire()
    second.release()


# ----------------------------------------------------------------- leases and fencing


async def test_a_sqlite_file_is_claimed_whole_by_one_process(tmp_path: Path) -> None:
    location = StateLocation(str(tmp_path / "state.db"))
    async with open_store(location) as first, open_store(location) as second:
        await create(first, JobRecord(name="a", fingerprint="f"))
        assert set(await first.claim(["a"])) == {"a"}
        assert await second.claim(["a"]) == {}  # the first owns the file, so every job


async def test_one_worker_at_a_time_drives_a_job(postgres_url: str) -> None:
    location = StateLocation(postgres_url)
    async with (
        open_store(location, lease_ttl=0.5) as a,
        open_store(location, lease_ttl=0.5) as b,
    ):
        record = JobRecord(name="j", fingerprint="f")
        await create(a, record, claim=False)  # recorded free
        with pytest.raises(LeaseLost):
            await create(b, record, claim=False)  # a second create of the same job is refused
        with pytest.raises(LeaseLost):
            await a.save(record.evolve(poll_attempt=1))  # not claimed: not a's to write
        assert set(await a.claim(["j"])) == {"j"}
        assert await b.claim(["j"]) == {}
        leases = await b.leases()
        assert leases["j"].expires_in > 0
        assert leases["j"].worker == getattr(a, "worker", None)
        await anyio.sleep(0.7)  # a went quiet past its lease
        taken = await b.claim(["j"])
        assert taken["j"].state is State.PENDING
        # Fencing: a's token is no longer the job's, so nothing of a's lands.
        moved = record.evolve(state=State.DATASET_CREATED, dataset_id="ds_a")
        with pytest.raises(LeaseLost):
            await a.save(moved, Transition("j", State.PENDING, State.DATASET_CREATED, 1.0))
        assert await a.renew() == set()  # already known lost; nothing else was held
        await b.save(
            moved.evolve(dataset_id="ds_b"),
            Transition("j", State.PENDING, State.DATASET_CREATED, 2.0),
        )
        assert (await a.load(["j"]))["j"].dataset_id == "ds_b"
        assert [t.at for t in await a.history("j")] == [0.0, 2.0]


async def test_renew_reports_leases_taken_over(postgres_url: str) -> None:
    location = StateLocation(postgres_url)
    async with (
        open_store(location, lease_ttl=0.3) as a,
        open_store(location, lease_ttl=30) as b,
    ):
        await create(a, JobRecord(name="x", fingerprint="f"), claim=False)
        await create(a, JobRecord(name="y", fingerprint="f"), claim=False)
        assert set(await a.claim(["x", "y", "z"], limit=1)) == {"x"}  # at most limit
        assert set(await a.claim(["x", "y"])) == {"y"}
        assert await a.renew() == set()
        await anyio.sleep(0.5)
        assert set(await b.claim(["x", "y"])) == {"x", "y"}
        assert await a.renew() == {"x", "y"}


async def test_an_ended_job_releases_its_lease_and_release_frees_the_rest(
    postgres_url: str,
) -> None:
    location = StateLocation(postgres_url)
    async with open_store(location) as a, open_store(location) as b:
        record = JobRecord(name="done", fingerprint="f", state=State.TRAINING)
        await create(a, record)
        await create(a, JobRecord(name="held", fingerprint="f"))
        await a.save(
            record.evolve(state=State.SUCCEEDED),
            Transition("done", State.TRAINING, State.SUCCEEDED, 1.0),
        )
        assert set(await b.leases()) == {"held"}
        await a.release()
        assert set(await b.claim(["held", "done"])) == {"held", "done"}


async def test_each_due_event_goes_to_one_deliverer(postgres_url: str) -> None:
    location = StateLocation(postgres_url)
    async with open_store(location) as a, open_store(location) as b:
        record = JobRecord(name="e", fingerprint="f")
        events = [OutboxEvent(f"http://r.test/{i}", "{}") for i in range(5)]
        await a.save(record, Transition("e", None, State.PENDING, 0.0), events=events)
        first, second = await a.claim_events(3), await b.claim_events(10)
        assert len(first) == 3 and len(second) == 2
        assert {e.id for e in first}.isdisjoint(e.id for e in second)
        assert len(await a.undelivered()) == 5  # taken, not delivered


async def test_a_cancel_request_wakes_the_listeners(postgres_url: str) -> None:
    location = StateLocation(postgres_url)
    async with open_store(location) as a, open_store(location) as b:
        await b.wait_for_cancels(0.01)  # listening from now
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(b.wait_for_cancels, 30.0)
            await anyio.sleep(0.1)
            await a.request_cancel(["j"])
        assert time.monotonic() - started < 10  # woken by NOTIFY, not by the 30 s poll
        assert await b.cancel_requests() == {"j"}


async def test_workers_starting_together_migrate_once(postgres_url: str) -> None:
    location = StateLocation(postgres_url)

    async def start() -> None:
        async with open_store(location):
            pass

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(start)
    async with open_store(location) as store:
        assert await store.count_by_state() == {}


async def test_a_newer_database_schema_is_refused_in_one_line(postgres_url: str) -> None:
    import asyncpg

    from orchestrator.pgstore import SCHEMA_VERSION as PG_VERSION

    location = StateLocation(postgres_url)
    async with open_store(location):
        pass
    schema = postgres_url.rsplit("schema=", 1)[1]
    conn = await asyncpg.connect(postgres_url.split("?")[0])
    try:
        await conn.execute(
            f"UPDATE \"{schema}\".meta SET value = '{PG_VERSION + 1}' WHERE key = 'schema_version'"
        )
    finally:
        await conn.close()
    with pytest.raises(StoreError, match=r"newer than this orchestrator's") as caught:
        async with open_store(location):
            pass
    assert "\n" not in str(caught.value)
