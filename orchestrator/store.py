"""The checkpoint store: where every job's record and transition history live.

``CheckpointStore`` is the small interface the engine and the CLI use; ``open_store``
opens the one a ``--state`` names. ``SqliteStore`` is the embedded default (WAL, mode
0600, versioned schema, one owner), ``pgstore.PostgresStore`` the one several workers
share, and ``MemoryStore`` serves unit tests. Every failure of the store itself is a
``StoreError`` naming it.

Writes are group-committed (``GroupCommit``, for SQLite and PostgreSQL alike): every
``save`` waits until its row is durable, but all the saves that arrive while one commit
is in flight share the next commit, so hundreds of jobs transitioning at once cost a
handful of fsyncs, not hundreds.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import urlsplit

import anyio
import anyio.lowlevel
import anyio.to_thread

from orchestrator.errors import InputError, LeaseLost, StateLockedError, StoreError
from orchestrator.notify import OutboxEvent
from orchestrator.states import JobRecord, State, Transition

SCHEMA_VERSION = 3
DEFAULT_LEASE_TTL = 30.0  # seconds a shared store's job stays with a worker that went quiet


@dataclass(frozen=True)
class StateLocation:
    """Where the checkpoints live: a SQLite file (a path) or a PostgreSQL database (a
    ``postgresql://`` URL), and where its password is, if not in the URL."""

    value: str = field(repr=False)  # a URL may hold a password
    password_file: Path | None = None

    @property
    def is_database(self) -> bool:
        return self.value.startswith(("postgresql://", "postgres://"))

    @property
    def path(self) -> Path:
        return Path(self.value)

    def exists(self) -> bool:
        """A database always exists (its tables are made on first use); a file may not."""
        return self.is_database or self.path.exists()

    def password(self) -> str | None:
        """The database password: the file's, else the URL's (for redaction too)."""
        if self.password_file is None:
            return urlsplit(self.value).password if self.is_database else None
        try:
            return self.password_file.read_text().strip()
        except OSError as exc:
            raise InputError(f"{self.password_file}: cannot read: {exc.strerror}") from None

    def __str__(self) -> str:
        if not self.is_database:
            return self.value
        from orchestrator.pgstore import shown_url

        return shown_url(self.value)


@asynccontextmanager
async def open_store(
    location: StateLocation,
    *,
    owner: OwnerLock | None = None,
    lease_ttl: float = DEFAULT_LEASE_TTL,
) -> AsyncIterator[CheckpointStore]:
    """The store at ``location``, closed on the way out. A database's schema is brought
    up to date first (``orchestrator migrate`` does only that)."""
    store: CheckpointStore
    if location.is_database:
        from orchestrator.pgstore import PostgresStore

        store = await PostgresStore.connect(
            location.value, password=location.password(), lease_ttl=lease_ttl
        )
    else:
        store = SqliteStore(location.path, owner=owner)
    try:
        yield store
    finally:
        await store.aclose()


@dataclass(frozen=True)
class SharedDataset:
    """An uploaded dataset that later jobs with the same content may reuse."""

    content_key: str
    dataset_id: str
    s3_key: str


@dataclass(frozen=True)
class Lease:
    """Who drives a job of a shared store, and since when (seconds, by the store's clock)."""

    worker: str
    age: float
    expires_in: float  # negative once expired: any worker may take the job over

    def public(self) -> dict[str, Any]:
        """For ``status --json`` and ``/jobs``, beside the job's own fields."""
        return {
            "worker": self.worker,
            "lease_age_s": round(self.age, 1),
            "lease_expires_in_s": round(self.expires_in, 1),
        }


class CheckpointStore(Protocol):
    """The checkpoints of every job, and who may drive which.

    A store with one owner (SQLite, memory) hands every job to the process that owns
    it. A ``shared`` store (PostgreSQL) hands each job to one process at a time under a
    lease of ``lease_ttl`` seconds: the holder renews it, and every save of a job whose
    lease another process took raises ``LeaseLost`` instead of writing.
    """

    shared: bool
    lease_ttl: float
    schema: tuple[int, int]  # the schema version found on opening, and the version now

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

    async def claim_events(self, limit: int) -> list[OutboxEvent]:
        """Events due now, each handed to one caller for a while: several processes may
        deliver from one outbox."""

    async def claim(self, names: Sequence[str], limit: int | None = None) -> dict[str, JobRecord]:
        """Take the leases of (at most ``limit`` of) these jobs that no live process
        drives; their records as they are now. A job's first save records it free. With
        one owner: every one of them, or none."""

    async def renew(self) -> set[str]:
        """Extend every lease held here; the names of those lost meanwhile."""

    async def release(self, names: Iterable[str] | None = None) -> None:
        """Give up these leases (all held here by default), for others to take now."""

    async def leases(self) -> dict[str, Lease]: ...

    def holds(self, name: str) -> bool:
        """Whether this process holds the job's lease, as far as it knows right now."""

    async def wait_for_cancels(self, timeout: float) -> None:
        """Until a cancel may have been requested, or ``timeout`` seconds."""

    async def aclose(self) -> None: ...


# ------------------------------------------------------------------ row mapping

_FIELDS = [f.name for f in fields(JobRecord)]
_LISTS = ("abandoned_datasets", "abandoned_finetunes")  # stored as JSON arrays
_OBJECTS = ("usage", "upload_progress")  # stored as JSON objects


def _to_row(record: JobRecord) -> tuple[Any, ...]:
    values = vars(record)
    row = [values[name] for name in _FIELDS]
    row[_FIELDS.index("state")] = record.state.value
    for name in _LISTS:
        row[_FIELDS.index(name)] = json.dumps(list(values[name]))
    for name in _OBJECTS:
        if values[name] is not None:
            row[_FIELDS.index(name)] = json.dumps(values[name])
    return tuple(row)


def _history_row(t: Transition) -> tuple[Any, ...]:
    return (t.name, t.old.value if t.old else None, t.new.value, t.at, t.detail)


def _transition(row: Sequence[Any]) -> Transition:
    return Transition(row[0], State(row[1]) if row[1] else None, State(row[2]), row[3], row[4])


def _from_row(row: sqlite3.Row | tuple[Any, ...]) -> JobRecord:
    values = dict(zip(_FIELDS, row, strict=True))
    values["state"] = State(values["state"])
    values["adoptable"] = bool(values["adoptable"])
    values["phase_adopted"] = bool(values["phase_adopted"])
    for name in _LISTS:
        values[name] = tuple(json.loads(values[name] or "[]"))
    for name in _OBJECTS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
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
    updated_at REAL NOT NULL,
    api TEXT NOT NULL DEFAULT 'finetune',
    last_event TEXT,
    validation_file_id TEXT,
    upload_progress TEXT
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
    2: """
ALTER TABLE jobs ADD COLUMN api TEXT NOT NULL DEFAULT 'finetune';
ALTER TABLE jobs ADD COLUMN last_event TEXT;
ALTER TABLE jobs ADD COLUMN validation_file_id TEXT;
ALTER TABLE jobs ADD COLUMN upload_progress TEXT;
""",
}

_UPSERT = (
    f"INSERT INTO jobs ({', '.join(_FIELDS)}) VALUES ({', '.join('?' for _ in _FIELDS)}) "
    f"ON CONFLICT(name) DO UPDATE SET "
    + ", ".join(f"{n} = excluded.{n}" for n in _FIELDS if n != "name")
)


@dataclass(frozen=True)
class Save:
    """One ``save``: the record, its transition, a dataset it made shareable, and the
    notifications it owes, committed together or not at all."""

    record: JobRecord
    transition: Transition | None
    dataset: SharedDataset | None
    events: Sequence[OutboxEvent]


class _Batch:
    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: BaseException | None = None
        self.lost: set[str] = set()


class GroupCommit:
    """Saves that arrive while a commit is in flight share the next commit.

    ``write`` commits a batch and returns the names whose saves it refused (a shared
    store's fencing); each of those saves raises ``LeaseLost``. A commit that would carry
    fewer than ``LINGER_BELOW`` saves first waits ``linger`` seconds for more: most of a
    commit's cost is per commit, not per row, and jobs that are not moving in step would
    otherwise commit one or two at a time.
    """

    LINGER_BELOW = 32

    def __init__(self, write: Callable[[list[Save]], Awaitable[set[str]]], linger: float) -> None:
        self.write = write
        self.linger = linger
        self._pending: list[Save] = []
        self._batch = _Batch()
        self._flushing = False
        self._leader_done = anyio.Event()
        self.commits = 0  # observable by tests and the benchmark

    async def save(self, item: Save) -> None:
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
                    current.lost = await self.write(items)
                    self.commits += 1
            except BaseException as exc:  # handed to every waiter of the batch
                current.error = exc
            finally:
                self._flushing = False
                current.done.set()
                done, self._leader_done = self._leader_done, anyio.Event()
                done.set()
        if batch.error is not None:
            raise batch.error
        if item.record.name in batch.lost:
            raise LeaseLost(f"{item.record.name}: another worker holds its lease")


class OneOwner(ABC):
    """The lease half of ``CheckpointStore`` for a store one process owns whole: every
    job is this process's, nothing is fenced, nothing needs renewing, and one process
    delivers the outbox."""

    shared = False
    lease_ttl = math.inf

    async def renew(self) -> set[str]:
        return set()

    async def release(self, names: Iterable[str] | None = None) -> None:
        return None  # nothing to give back: the owner's lock goes when the store closes

    async def leases(self) -> dict[str, Lease]:
        return {}

    def holds(self, name: str) -> bool:
        return True

    async def wait_for_cancels(self, timeout: float) -> None:
        await anyio.sleep(timeout)  # no notifications: the caller polls

    @abstractmethod
    async def due_events(self, now: float, limit: int, since: float = 0.0) -> list[OutboxEvent]: ...

    async def claim_events(self, limit: int) -> list[OutboxEvent]:
        return await self.due_events(time.time(), limit)


class SqliteStore(OneOwner):
    """SQLite in WAL mode. One connection, used from one worker thread at a time.

    One process owns the file (``OwnerLock``): its leases are the whole file's, so a
    claim is all or nothing and nothing is fenced (``shared`` is False).
    """

    def __init__(
        self, path: Path, linger: float = 0.005, *, owner: OwnerLock | None = None
    ) -> None:
        self.path = path
        self.owner = owner or OwnerLock(path)  # the one the caller holds, if it does
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
        self._group = GroupCommit(self._write_batch, linger)

    @property
    def commits(self) -> int:
        return self._group.commits

    def _migrate(self) -> None:
        db = self._db
        db.executescript(_SCHEMA)  # creates what is missing; a new file is at the latest
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0])
            self.schema = (version, SCHEMA_VERSION)
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
        self.owner.release()

    async def aclose(self) -> None:
        self.close()

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
        await self._group.save(Save(record, transition, dataset, events))

    async def _write_batch(self, items: list[Save]) -> set[str]:
        await self._run(self._write, items)
        return set()  # one owner: nothing is fenced

    def _write(self, items: list[Save]) -> None:
        now = time.time()
        datasets = [(d.content_key, d.dataset_id, d.s3_key, now) for i in items if (d := i.dataset)]
        events = [(e.url, e.body, now, now) for i in items for e in i.events]
        # Later saves of the same job in one batch supersede earlier ones.
        rows = {i.record.name: _to_row(i.record) for i in items}
        history = [_history_row(t) for i in items if (t := i.transition)]
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
            return [_transition(r) for r in rows]

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

    # ----------------------------------------------- one owner: leases are the file's

    async def claim(self, names: Sequence[str], limit: int | None = None) -> dict[str, JobRecord]:
        if not self.owner.held:
            try:
                self.owner.acquire()
            except StateLockedError:
                return {}  # another process owns the file, and so every job in it
        return await self.load(names)


class MemoryStore(OneOwner):
    """The same contract in memory, for unit tests of the lifecycle."""

    schema = (SCHEMA_VERSION, SCHEMA_VERSION)

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

    async def claim(self, names: Sequence[str], limit: int | None = None) -> dict[str, JobRecord]:
        return await self.load(names)

    async def aclose(self) -> None:
        pass


class OwnerLock:
    """Only one engine may own a state file; the OS drops the lock when the process dies."""

    def __init__(self, state_path: Path) -> None:
        self.path = state_path.with_name(state_path.name + ".lock")
        self._handle: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._handle is not None

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
