"""One contract every store backend must pass, plus what only SQLite promises."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from orchestrator.errors import InputError, StateLockedError
from orchestrator.states import JobRecord, State, Transition
from orchestrator.store import CheckpointStore, MemoryStore, OwnerLock, SharedDataset, SqliteStore

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CheckpointStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    sqlite_store = SqliteStore(tmp_path / "state.db")
    yield sqlite_store
    sqlite_store.close()


async def test_records_round_trip_with_history(store: CheckpointStore) -> None:
    record = JobRecord(name="a", fingerprint="f1", abandoned_datasets=("ds_1",))
    await store.save(record, Transition("a", None, State.PENDING, 1.0))
    moved = record.evolve(state=State.DATASET_CREATED, dataset_id="ds_2", intent="create_dataset")
    await store.save(moved, Transition("a", State.PENDING, State.DATASET_CREATED, 2.0, "x"))
    await store.save(moved.evolve(poll_attempt=3))  # no transition: history unchanged
    loaded = (await store.load())["a"]
    assert loaded.state is State.DATASET_CREATED and loaded.dataset_id == "ds_2"
    assert loaded.abandoned_datasets == ("ds_1",) and loaded.poll_attempt == 3
    assert [t.new for t in await store.history("a")] == [State.PENDING, State.DATASET_CREATED]
    assert await store.load(["missing"]) == {}


async def test_cancel_requests_and_shared_datasets(store: CheckpointStore) -> None:
    await store.request_cancel(["a", "b"])
    await store.request_cancel(["a"])
    assert await store.cancel_requests() == {"a", "b"}
    await store.clear_cancel("a")
    assert await store.cancel_requests() == {"b"}
    assert await store.find_dataset("k") is None
    record = JobRecord(name="a", fingerprint="f", state=State.DATASET_READY, dataset_id="ds_9")
    await store.save(record, dataset=SharedDataset("k", "ds_9", "datasets/x.jsonl"))
    assert await store.find_dataset("k") == SharedDataset("k", "ds_9", "datasets/x.jsonl")


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
    with pytest.raises(InputError, match="schema version 99"):
        SqliteStore(path)


async def test_garbage_state_file_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(InputError, match="not a usable state file"):
        SqliteStore(path)


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
