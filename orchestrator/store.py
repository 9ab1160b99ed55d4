"""The checkpoint store: where every job's record and transition history live.

``CheckpointStore`` is the small interface the engine and the CLI use; ``SqliteStore``
is the embedded default (WAL, mode 0600, versioned schema) and ``MemoryStore`` serves
unit tests. Every failure of the file itself is a ``StoreError`` naming it.

Writes are group-committed: every ``save`` waits until its row is durable, but all the
saves that arrive while one commit is in flight share the next commit, so hundreds of
jobs transitioning at once cost a handful of fsyncs, not hundreds.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import IO, Any, Protocol

import anyio
import anyio.lowlevel
import anyio.to_thread

from orchestrator.errors import StateLockedError, StoreError
from orchestrator.notify import OutboxEvent
from orchestrator.states import JobRecord, State, Transition

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class SharedDataset:
    """An uploaded dataset that later jobs with the same content may reuse."""

    content_key: str
    dataset_id: str
    s3_key: str


class CheckpointStore(Protocol):
    async def load(self, names: Iterable[str] | None = None) -> dict[str, JobRecord]: ...

    async def save(
        self,
        record: JobRecord,
        transition: Transition | None = None,
        *,
        dataset: SharedDataset | None = None,
        events: Sequence[OutboxEvent] = (),
    ) -> None:
        """Returns once the record, its transition, a dataset it made shareable and the
        notifications it owes are durable, in one commit."""

    async def history(self, name: str) -> list[Transition]: ...

    async def request_cancel(self, names: Iterable[str]) -> None: ...

    async def cancel_requests(self) -> set[str]: ...

    async def clear_cancel(self, name: str) -> None: ...

    async def count_by_state(self) -> dict[str, int]: ...

    async def load_estimates(self) -> dict[str, float]:
        """Learned phase durations (see ``lifecycle.PhaseClock``)."""

    async def save_estimate(self, key: str, seconds: float) -> None: ...

    async def healthy(self) -> bool:
        """True when the store can take a write right now."""

    async def find_dataset(self, content_key: str) -> SharedDataset | None: ...

    async def forget(self, names: Iterable[str]) -> list[str]:
        """Remove these jobs that have ended, their history and any cancel request for
        them; the names removed (a job in flight stays)."""

    async def due_events(self, now: float, limit: int, since: float = 0.0) -> list[OutboxEvent]:
        """Undelivered notifications due by ``now`` (and made since ``since``), oldest
        first."""

    async def event_delivered(self, event_id: int) -> None: ...

    async def event_failed(self, event_id: int, next_at: float) -> None: ...

    async def undelivered(self) -> list[OutboxEvent]: ...


# ------------------------------------------------------------------ row mapping

_FIELDS = [f.name for f in fields(JobRecord)]
_LISTS = ("abandoned_datasets", "abandoned_finetunes")  # stored as JSON arrays


def _to_row(record: JobRecord) -> tuple[Any, ...]:
    values = vars(record)
    row = [values[name] for name in _FIELDS]
    row[_FIELDS.index("state")] = record.state.value
    for name in _LISTS:
        row[_FIELDS.index(name)] = json.dumps(list(values[name]))
    if record.usage is not None:
        row[_FIELDS.index("usage")] = json.dumps(record.usage)
    return tuple(row)


def _from_row(row: sqlite3.Row | tuple[Any, ...]) -> JobRecord:
    values = dict(zip(_FIELDS, row, strict=True))
    values["state"] = State(values["state"])
    values["adoptable"] = bool(values["adoptable"])
    values["phase_adopted"] = bool(values["phase_adopted"])
    for name in _LISTS:
        values[name] = tuple(json.loads(values[name] or "[]"))
    if values["usage"] is not None:
        values["usage"] = json.loads(values["usage"])
    return JobRecord(**values)


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    manifest TEXT NOT NULL,
    base_url TEXT NOT NULL,
    provider TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    attempt INTEGER NOT NULL,
    intent TEXT,
    content_sha256 TEXT,
    dataset_id TEXT,
    s3_key TEXT,
    upload_md5 TEXT,
    abandoned_datasets TEXT NOT NULL,
    finetune_id TEXT,
    abandoned_finetunes TEXT NOT NULL DEFAULT '[]',
    remote_status TEXT,
    unknown_status_since REAL,
    fine_tuned_model TEXT,
    usage TEXT,
    error TEXT,
    adoptable INTEGER NOT NULL DEFAULT 0,
    poll_attempt INTEGER NOT NULL,
    next_poll_at REAL,
    phase_started_at REAL,
    phase_adopted INTEGER NOT NULL DEFAULT 0,
    training_started_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    old_state TEXT,
    new_state TEXT NOT NULL,
    at REAL NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS transitions_by_name ON transitions (name, id);
CREATE TABLE IF NOT EXISTS cancel_requests (name TEXT PRIMARY KEY, requested_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS phase_estimates (key TEXT PRIMARY KEY, seconds REAL NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    delivered_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (delivered_at, next_at);
CREATE TABLE IF NOT EXISTS datasets (
    content_key TEXT PRIMARY KEY,
    dataset_id TEXT NOT NULL,
    s3_key TEXT NOT NULL,
    created_at REAL NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
"""

# From each version to the next; a state file is brought up to date when it is opened.
_MIGRATIONS: dict[int, str] = {
    1: """
ALTER TABLE jobs ADD COLUMN abandoned_finetunes TEXT NOT NULL DEFAULT '[]';
ALTER TABLE jobs ADD COLUMN unknown_status_since REAL;
ALTER TABLE jobs ADD COLUMN adoptable INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN phase_adopted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN provider TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN model TEXT NOT NULL DEFAULT '';
ALTER TABLE jobs ADD COLUMN usage TEXT;
ALTER TABLE jobs ADD COLUMN training_started_at REAL;
""",
}

_UPSERT = (
    f"INSERT INTO jobs ({', '.join(_FIELDS)}) VALUES ({', '.join('?' for _ in _FIELDS)}) "
    f"ON CONFLICT(name) DO UPDATE SET "
    + ", ".join(f"{n} = excluded.{n}" for n in _FIELDS if n != "name")
)


_Write = tuple[JobRecord, Transition | None] | SharedDataset | OutboxEvent


class _Batch:
    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: BaseException | None = None


class SqliteStore:
    """SQLite in WAL mode. One connection, used from one worker thread at a time.

    A commit that would carry fewer than ``LINGER_BELOW`` saves first waits ``linger``
    seconds for more: most of a commit's cost is per commit, not per row, and jobs that
    are not moving in step would otherwise commit one or two at a time.
    """

    LINGER_BELOW = 32

    def __init__(self, path: Path, linger: float = 0.005) -> None:
        self.path = path
        self.linger = linger
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                # Created 0600 before SQLite opens it: job ids and errors are nobody else's.
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as exc:
            raise StoreError(f"{path}: cannot create the state file: {exc.strerror}") from None
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout = 10000")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: not a usable state file ({exc})") from None
        self._thread_lock = threading.Lock()
        self._limiter = anyio.CapacityLimiter(1)
        self._pending: list[_Write] = []
        self._batch = _Batch()
        self._flushing = False
        self._leader_done = anyio.Event()
        self.commits = 0  # observable by tests and the benchmark

    def _migrate(self) -> None:
        db = self._db
        db.executescript(_SCHEMA)  # creates what is missing; a new file is at the latest
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: state schema version {version} is newer than this "
                    f"orchestrator's ({SCHEMA_VERSION}); upgrade the orchestrator"
                )
            while version < SCHEMA_VERSION:
                for statement in filter(str.strip, _MIGRATIONS[version].split(";")):
                    db.execute(statement)
                version += 1
            db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._thread_lock:
            self._db.close()

    async def _run(self, fn: Any, *args: Any) -> Any:
        def locked() -> Any:
            with self._thread_lock:
                try:
                    return fn(*args)
                except sqlite3.Error as exc:
                    raise StoreError(f"{self.path}: {exc}") from None

        return await anyio.to_thread.run_sync(locked, limiter=self._limiter)

    # ------------------------------------------------------------------- writes

    async def save(
        self,
        record: JobRecord,
        transition: Transition | None = None,
        *,
        dataset: SharedDataset | None = None,
        events: Sequence[OutboxEvent] = (),
    ) -> None:
        if dataset is not None:
            self._pending.append(dataset)  # goes out in the record's commit
        self._pending.extend(events)  # so do the notifications it owes
        await self._commit((record, transition))

    async def _commit(self, item: _Write) -> None:
        self._pending.append(item)
        batch = self._batch
        while not batch.done.is_set():
            if self._flushing:
                await self._leader_done.wait()  # then one of us leads the next batch
                continue
            # Lead: commit everything pending (our batch), then hand over at once, so a
            # leader never waits on batches that arrived after its own.
            self._flushing = True
            current = self._batch
            try:
                with anyio.CancelScope(shield=True):  # a commit is never cut in half
                    if len(self._pending) < self.LINGER_BELOW:
                        await anyio.sleep(self.linger)  # saves made meanwhile join in
                    items, self._pending = self._pending, []
                    self._batch = _Batch()
                    await self._run(self._write, items)
            except BaseException as exc:  # handed to every waiter of the batch
                current.error = exc
            finally:
                self._flushing = False
                current.done.set()
                done, self._leader_done = self._leader_done, anyio.Event()
                done.set()
        if batch.error is not None:
            raise batch.error

    def _write(self, items: list[_Write]) -> None:
        now = time.time()
        datasets = [
            (i.content_key, i.dataset_id, i.s3_key, now)
            for i in items
            if isinstance(i, SharedDataset)
        ]
        events = [(e.url, e.body, now, now) for e in items if isinstance(e, OutboxEvent)]
        saves = [i for i in items if isinstance(i, tuple)]
        # Later saves of the same job in one batch supersede earlier ones.
        rows = {record.name: _to_row(record) for record, _ in saves}
        history = [
            (t.name, t.old.value if t.old else None, t.new.value, t.at, t.detail)
            for _, t in saves
            if t is not None
        ]
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_UPSERT, rows.values())
            if history:
                db.executemany(
                    "INSERT INTO transitions (name, old_state, new_state, at, detail) "
                    "VALUES (?, ?, ?, ?, ?)",
                    history,
                )
            if events:
                db.executemany(
                    "INSERT INTO outbox (url, body, created_at, next_at) VALUES (?, ?, ?, ?)",
                    events,
                )
            if datasets:
                db.executemany(
                    "INSERT OR REPLACE INTO datasets (content_key, dataset_id, s3_key, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    datasets,
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite rolls back by itself on a full disk or I/O error
                db.execute("ROLLBACK")
            raise
        self.commits += 1

    async def request_cancel(self, names: Iterable[str]) -> None:
        now = time.time()
        rows = [(n, now) for n in names]

        def write() -> None:
            with self._db:
                self._db.executemany(
                    "INSERT OR IGNORE INTO cancel_requests (name, requested_at) VALUES (?, ?)", rows
                )

        await self._run(write)

    # -------------------------------------------------------------------- reads

    async def load(self, names: Iterable[str] | None = None) -> dict[str, JobRecord]:
        wanted = list(names) if names is not None else None

        def read() -> dict[str, JobRecord]:
            sql = f"SELECT {', '.join(_FIELDS)} FROM jobs"
            if wanted is None:
                rows = self._db.execute(sql).fetchall()
            else:
                rows = []
                for start in range(0, len(wanted), 500):
                    chunk = wanted[start : start + 500]
                    rows += self._db.execute(
                        f"{sql} WHERE name IN ({', '.join('?' for _ in chunk)})", chunk
                    ).fetchall()
            return {row[0]: _from_row(row) for row in rows}

        result: dict[str, JobRecord] = await self._run(read)
        return result

    async def history(self, name: str) -> list[Transition]:
        def read() -> list[Transition]:
            rows = self._db.execute(
                "SELECT name, old_state, new_state, at, detail FROM transitions "
                "WHERE name = ? ORDER BY id",
                (name,),
            ).fetchall()
            return [
                Transition(r[0], State(r[1]) if r[1] else None, State(r[2]), r[3], r[4])
                for r in rows
            ]

        result: list[Transition] = await self._run(read)
        return result

    async def cancel_requests(self) -> set[str]:
        def read() -> set[str]:
            return {r[0] for r in self._db.execute("SELECT name FROM cancel_requests")}

        result: set[str] = await self._run(read)
        return result

    async def find_dataset(self, content_key: str) -> SharedDataset | None:
        def read() -> SharedDataset | None:
            row = self._db.execute(
                "SELECT content_key, dataset_id, s3_key FROM datasets WHERE content_key = ?",
                (content_key,),
            ).fetchone()
            return SharedDataset(*row) if row else None

        result: SharedDataset | None = await self._run(read)
        return result

    async def clear_cancel(self, name: str) -> None:
        def write() -> None:
            with self._db:
                self._db.execute("DELETE FROM cancel_requests WHERE name = ?", (name,))

        await self._run(write)

    async def due_events(self, now: float, limit: int, since: float = 0.0) -> list[OutboxEvent]:
        def read() -> list[OutboxEvent]:
            rows = self._db.execute(
                "SELECT url, body, id, attempts, created_at FROM outbox WHERE delivered_at"
                " IS NULL AND next_at <= ? AND created_at >= ? ORDER BY id LIMIT ?",
                (min(now, 1e300), since, limit),
            ).fetchall()
            return [OutboxEvent(*row) for row in rows]

        result: list[OutboxEvent] = await self._run(read)
        return result

    async def event_delivered(self, event_id: int) -> None:
        def write() -> None:
            with self._db:
                self._db.execute(
                    "UPDATE outbox SET delivered_at = ? WHERE id = ?", (time.time(), event_id)
                )

        await self._run(write)

    async def event_failed(self, event_id: int, next_at: float) -> None:
        def write() -> None:
            with self._db:
                self._db.execute(
                    "UPDATE outbox SET attempts = attempts + 1, next_at = ? WHERE id = ?",
                    (next_at, event_id),
                )

        await self._run(write)

    async def undelivered(self) -> list[OutboxEvent]:
        return await self.due_events(math.inf, 1_000_000)

    async def forget(self, names: Iterable[str]) -> list[str]:
        wanted = list(names)
        ended = tuple(state.value for state in State if state.terminal)

        def write() -> list[str]:
            gone = []
            with self._db:
                for name in wanted:
                    deleted = self._db.execute(
                        "DELETE FROM jobs WHERE name = ? AND state IN (?, ?, ?)", (name, *ended)
                    )
                    if deleted.rowcount:
                        gone.append(name)
                        for table in ("transitions", "cancel_requests"):
                            self._db.execute(f"DELETE FROM {table} WHERE name = ?", (name,))
            return gone

        result: list[str] = await self._run(write)
        return result

    async def load_estimates(self) -> dict[str, float]:
        def read() -> dict[str, float]:
            return dict(self._db.execute("SELECT key, seconds FROM phase_estimates").fetchall())

        result: dict[str, float] = await self._run(read)
        return result

    async def save_estimate(self, key: str, seconds: float) -> None:
        def write() -> None:
            with self._db:
                self._db.execute(
                    "INSERT OR REPLACE INTO phase_estimates (key, seconds) VALUES (?, ?)",
                    (key, seconds),
                )

        await self._run(write)

    async def count_by_state(self) -> dict[str, int]:
        def read() -> dict[str, int]:
            rows = self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state")
            return {state: count for state, count in rows}

        result: dict[str, int] = await self._run(read)
        return result

    async def healthy(self) -> bool:
        def probe() -> bool:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                return False
            return True

        result: bool = await self._run(probe)
        return result


class MemoryStore:
    """The same contract in memory, for unit tests of the lifecycle."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobRecord] = {}
        self.transitions: list[Transition] = []
        self.cancels: set[str] = set()
        self.datasets: dict[str, SharedDataset] = {}
        self.estimates: dict[str, float] = {}
        self.outbox: dict[int, OutboxEvent] = {}
        self.next_at: dict[int, float] = {}
        self.delivered: set[int] = set()

    async def load(self, names: Iterable[str] | None = None) -> dict[str, JobRecord]:
        if names is None:
            return dict(self.jobs)
        return {n: self.jobs[n] for n in names if n in self.jobs}

    async def save(
        self,
        record: JobRecord,
        transition: Transition | None = None,
        *,
        dataset: SharedDataset | None = None,
        events: Sequence[OutboxEvent] = (),
    ) -> None:
        await anyio.lowlevel.checkpoint()
        for event in events:
            number = len(self.outbox) + 1
            self.outbox[number] = OutboxEvent(event.url, event.body, number, 0, time.time())
            self.next_at[number] = 0.0
        self.jobs[record.name] = record
        if transition is not None:
            self.transitions.append(transition)
        if dataset is not None:
            self.datasets[dataset.content_key] = dataset

    async def history(self, name: str) -> list[Transition]:
        return [t for t in self.transitions if t.name == name]

    async def request_cancel(self, names: Iterable[str]) -> None:
        self.cancels.update(names)

    async def cancel_requests(self) -> set[str]:
        return set(self.cancels)

    async def clear_cancel(self, name: str) -> None:
        self.cancels.discard(name)

    async def due_events(self, now: float, limit: int, since: float = 0.0) -> list[OutboxEvent]:
        due = [e for e in self.outbox.values() if e.id not in self.delivered]
        due = [e for e in due if e.created_at >= since]
        return [e for e in due if self.next_at[e.id] <= min(now, 1e300)][:limit]

    async def event_delivered(self, event_id: int) -> None:
        self.delivered.add(event_id)

    async def event_failed(self, event_id: int, next_at: float) -> None:
        event = self.outbox[event_id]
        self.outbox[event_id] = replace(event, attempts=event.attempts + 1)
        self.next_at[event_id] = next_at

    async def undelivered(self) -> list[OutboxEvent]:
        return await self.due_events(math.inf, 1_000_000)

    async def forget(self, names: Iterable[str]) -> list[str]:
        gone = [n for n in names if n in self.jobs and self.jobs[n].state.terminal]
        for name in gone:
            del self.jobs[name]
        self.transitions = [t for t in self.transitions if t.name not in gone]
        self.cancels -= set(gone)
        return gone

    async def find_dataset(self, content_key: str) -> SharedDataset | None:
        return self.datasets.get(content_key)

    async def load_estimates(self) -> dict[str, float]:
        return dict(self.estimates)

    async def save_estimate(self, key: str, seconds: float) -> None:
        self.estimates[key] = seconds

    async def count_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.jobs.values():
            counts[record.state.value] = counts.get(record.state.value, 0) + 1
        return counts

    async def healthy(self) -> bool:
        return True


class OwnerLock:
    """Only one engine may own a state file; the OS drops the lock when the process dies."""

    def __init__(self, state_path: Path) -> None:
        self.path = state_path.with_name(state_path.name + ".lock")
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")  # noqa: SIM115 - held for the process's lifetime
        except OSError as exc:
            raise StoreError(
                f"{self.path.with_suffix('')}: cannot use the state file: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise StateLockedError(
                f"{self.path.with_suffix('')}: state file is in use by {owner}; "
                "only one `run` or `daemon` may own it at a time"
            ) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._handle = handle

    def held_by_other(self) -> bool:
        """True when some other process owns the state file right now."""
        if self._handle is not None or not self.path.exists():
            return False
        with open(self.path) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None
