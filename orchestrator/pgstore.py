"""The PostgreSQL store: one database shared by every worker, each job under a lease.

The database is the control plane (as in procrastinate or DBOS): there is no
coordinator of ours. A worker claims jobs with ``SELECT ... FOR UPDATE SKIP LOCKED``,
holds each under a lease (owner, token, expiry by the database's clock) that its
heartbeat renews, and every save of a job checks the token: a worker whose lease was
taken over (it paused, or lost the network) writes nothing for that job again.

The schema is versioned; ``connect`` applies what is missing under an advisory lock, so
the first of several workers to start migrates and the others wait for it. Tables live
in the schema ``orchestrator`` (``?schema=NAME`` in the URL picks another).
"""

from __future__ import annotations

import math
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import asyncpg
import orjson

from orchestrator.errors import StoreError
from orchestrator.notify import OutboxEvent
from orchestrator.states import JobRecord, State, Transition
from orchestrator.store import (
    _FIELDS,
    GroupCommit,
    Lease,
    Save,
    SharedDataset,
    _from_row,
    _history_row,
    _to_row,
    _transition,
)

CHANNEL = "orchestrator_cancels"
MIGRATION_LOCK = 0x6F72636865  # the advisory lock key every worker migrates under
NOW = "extract(epoch from clock_timestamp())"  # the database's clock, for every lease
_TERMINAL = [state.value for state in State if state.terminal]
_COLUMNS = ", ".join(_FIELDS)
_UPDATED = ", ".join(f"{n} = v.{n}" for n in _FIELDS if n != "name")

# Each entry brings the schema from its index to the next version.
MIGRATIONS: list[str] = [
    """
CREATE TABLE jobs (
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
    unknown_status_since DOUBLE PRECISION,
    fine_tuned_model TEXT,
    usage TEXT,
    error TEXT,
    adoptable BOOLEAN NOT NULL DEFAULT FALSE,
    poll_attempt INTEGER NOT NULL,
    next_poll_at DOUBLE PRECISION,
    phase_started_at DOUBLE PRECISION,
    phase_adopted BOOLEAN NOT NULL DEFAULT FALSE,
    training_started_at DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    api TEXT NOT NULL DEFAULT 'finetune',
    last_event TEXT,
    validation_file_id TEXT,
    upload_progress TEXT,
    lease_owner TEXT,
    lease_token BIGINT,
    lease_claimed_at DOUBLE PRECISION,
    lease_expires_at DOUBLE PRECISION
);
CREATE INDEX jobs_by_lease_owner ON jobs (lease_owner);
CREATE SEQUENCE lease_tokens;
CREATE TABLE transitions (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    old_state TEXT,
    new_state TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    detail TEXT,
    worker TEXT
);
CREATE INDEX transitions_by_name ON transitions (name, id);
CREATE TABLE cancel_requests (name TEXT PRIMARY KEY, requested_at DOUBLE PRECISION NOT NULL);
CREATE TABLE phase_estimates (key TEXT PRIMARY KEY, seconds DOUBLE PRECISION NOT NULL);
CREATE TABLE outbox (
    id BIGSERIAL PRIMARY KEY,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at DOUBLE PRECISION NOT NULL,
    delivered_at DOUBLE PRECISION
);
CREATE INDEX outbox_due ON outbox (next_at) WHERE delivered_at IS NULL;
CREATE TABLE datasets (
    content_key TEXT PRIMARY KEY,
    dataset_id TEXT NOT NULL,
    s3_key TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
""",
]
SCHEMA_VERSION = len(MIGRATIONS)

# Saves of jobs this worker holds: the token must still be the one its claim got.
_UPDATE = f"""
UPDATE jobs SET {_UPDATED},
    lease_owner = CASE WHEN v.state = ANY($2::text[]) THEN NULL ELSE jobs.lease_owner END,
    lease_expires_at = CASE WHEN v.state = ANY($2::text[]) THEN NULL
                            ELSE jobs.lease_expires_at END
FROM jsonb_populate_recordset(NULL::jobs, $1::jsonb) AS v
WHERE jobs.name = v.name AND jobs.lease_token = v.lease_token
RETURNING jobs.name
"""
# A new job is recorded free (any worker with room claims it); of two workers creating
# the same job, only one's insert lands.
_INSERT = f"""
INSERT INTO jobs ({_COLUMNS})
SELECT {_COLUMNS} FROM jsonb_populate_recordset(NULL::jobs, $1::jsonb)
ON CONFLICT (name) DO NOTHING
RETURNING name
"""
_CLAIM = f"""
WITH free AS (
    SELECT name FROM jobs
    WHERE name = ANY($1::text[])
      AND (lease_owner IS NULL OR lease_expires_at < {NOW})
    ORDER BY name
    LIMIT $4
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs SET lease_owner = $2, lease_token = nextval('lease_tokens'),
    lease_claimed_at = {NOW}, lease_expires_at = {NOW} + $3
FROM free WHERE jobs.name = free.name
RETURNING {", ".join(f"jobs.{n}" for n in _FIELDS)}, jobs.lease_token
"""


_SECRET_PARAMS = {"password", "sslpassword", "passfile", "sslkey"}


def shown_url(url: str) -> str:
    """The URL as it may be printed and logged: no password, in the userinfo or in the
    query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    query = urlencode([(k, "***" if k in _SECRET_PARAMS else v) for k, v in parse_qsl(parts.query)])
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def worker_name() -> str:
    """This process among the workers: host, pid, and a few random characters (a pid is
    reused after a restart; a lease must not be)."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(2).hex()}"


def _split_schema(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    schema = next((v for k, v in query if k == "schema"), "orchestrator")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
        raise StoreError(f"{shown_url(url)}: schema {schema!r} must be 1-63 of a-z, 0-9, _")
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), schema


class PostgresStore:
    """``CheckpointStore`` on PostgreSQL, shared by any number of worker processes."""

    shared = True
    LINGER = 0.005

    def __init__(self, pool: Any, shown: str, lease_ttl: float, connect: dict[str, Any]) -> None:
        self._pool = pool
        self.shown = shown  # the URL without its password, for messages
        self.lease_ttl = lease_ttl
        self.worker = worker_name()
        self._connect = connect  # for the listener's own connection
        self._tokens: dict[str, int] = {}  # the leases held here, by job
        self._group = GroupCommit(self._write_batch, self.LINGER)
        self._listener: Any = None
        self._cancel_hint = anyio.Event()
        self.schema = (SCHEMA_VERSION, SCHEMA_VERSION)

    @classmethod
    async def connect(
        cls, url: str, *, password: str | None = None, lease_ttl: float = 30.0
    ) -> PostgresStore:
        dsn, schema = _split_schema(url)
        shown = shown_url(url)
        options: dict[str, Any] = {
            "dsn": dsn,
            "server_settings": {"search_path": schema, "application_name": "orchestrator"},
        }
        if password is not None:
            options["password"] = password
        try:
            # A statement that hangs (a lock, a dead server) fails instead of holding
            # a renewal forever.
            pool = await asyncpg.create_pool(
                min_size=1, max_size=4, timeout=10, command_timeout=60, **options
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise StoreError(f"{shown}: cannot connect: {_reason(exc)}") from None
        store = cls(pool, shown, lease_ttl, options)
        try:
            store.schema = await store.migrate(schema)
        except BaseException:
            await pool.close()
            raise
        return store

    @property
    def commits(self) -> int:
        return self._group.commits

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except asyncpg.DeadlockDetectedError:
            raise  # the caller tries its transaction again
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise StoreError(f"{self.shown}: {_reason(exc)}") from None

    async def migrate(self, schema: str) -> tuple[int, int]:
        """Bring the schema up to date; (the version found, the version now)."""
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            found = await conn.fetchval("SELECT value FROM meta WHERE key = 'schema_version'")
            version = int(found or 0)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.shown}: state schema version {version} is newer than this "
                    f"orchestrator's ({SCHEMA_VERSION}); upgrade the orchestrator"
                )
            for step in MIGRATIONS[version:]:
                await conn.execute(step)
            await conn.execute(
                "INSERT INTO meta VALUES ('schema_version', $1) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                str(SCHEMA_VERSION),
            )
        return version, SCHEMA_VERSION

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.release()
            except StoreError:
                pass  # the leases expire by themselves
            if self._listener is not None:
                await self._listener.close()
            await self._pool.close()

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
        if record.state.terminal:
            self._tokens.pop(record.name, None)  # the save released the lease

    async def _write_batch(self, items: list[Save]) -> set[str]:
        # A job's first save creates it (and claims it); later saves of the same job in
        # one batch supersede earlier ones.
        created = {i.record.name: i for i in items if i.transition and i.transition.old is None}
        updated = {
            i.record.name: i for i in items if not (i.transition and i.transition.old is None)
        }
        for attempt in range(5):
            try:
                written = await self._commit(items, created, updated)
                break
            except asyncpg.DeadlockDetectedError:  # rolled back whole: tried again
                if attempt == 4:
                    raise StoreError(f"{self.shown}: deadlocked five times in a row") from None
                await anyio.sleep(0.01 * (attempt + 1))
        lost = (set(created) | set(updated)) - written
        for name in lost:
            self._tokens.pop(name, None)
        return lost

    async def _commit(
        self, items: list[Save], created: dict[str, Save], updated: dict[str, Save]
    ) -> set[str]:
        """One transaction for a batch; the names whose saves landed."""
        async with self._conn() as conn, conn.transaction():
            written: set[str] = set()
            if created:
                rows = [_row(i.record) for i in created.values()]
                made = await conn.fetch(_INSERT, _json(rows))
                written.update(r[0] for r in made)
            if updated:
                rows = [
                    _row(i.record, self._tokens.get(name, -1))
                    for name, i in sorted(updated.items())  # rows locked in name order
                ]
                done = await conn.fetch(_UPDATE, _json(rows), _TERMINAL)
                written.update(r[0] for r in done)
            kept = [i for i in items if i.record.name in written]
            # Each transition says which worker made it: the audit trail of a takeover.
            history = [(*_history_row(t), self.worker) for i in kept if (t := i.transition)]
            if history:
                await conn.executemany(
                    "INSERT INTO transitions (name, old_state, new_state, at, detail, worker) "
                    "VALUES ($1, $2, $3, $4, $5, $6)",
                    history,
                )
            now = time.time()
            events = [(e.url, e.body, now, now) for i in kept for e in i.events]
            if events:
                await conn.executemany(
                    "INSERT INTO outbox (url, body, created_at, next_at) VALUES ($1, $2, $3, $4)",
                    events,
                )
            datasets = [
                (d.content_key, d.dataset_id, d.s3_key, now) for i in kept if (d := i.dataset)
            ]
            if datasets:
                await conn.executemany(
                    "INSERT INTO datasets VALUES ($1, $2, $3, $4) ON CONFLICT (content_key) "
                    "DO UPDATE SET dataset_id = excluded.dataset_id, s3_key = excluded.s3_key",
                    datasets,
                )
        return written

    async def request_cancel(self, names: Iterable[str]) -> None:
        async with self._conn() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO cancel_requests SELECT unnest($1::text[]), $2 ON CONFLICT DO NOTHING",
                list(names),
                time.time(),
            )
            await conn.execute(f"NOTIFY {CHANNEL}")  # delivered at commit

    async def clear_cancel(self, name: str) -> None:
        await self._execute("DELETE FROM cancel_requests WHERE name = $1", name)

    async def save_estimate(self, key: str, seconds: float) -> None:
        await self._execute(
            "INSERT INTO phase_estimates VALUES ($1, $2) "
            "ON CONFLICT (key) DO UPDATE SET seconds = excluded.seconds",
            key,
            seconds,
        )

    async def event_delivered(self, event_id: int) -> None:
        await self._execute(
            "UPDATE outbox SET delivered_at = $1 WHERE id = $2", time.time(), event_id
        )

    async def event_failed(self, event_id: int, next_at: float) -> None:
        await self._execute(
            "UPDATE outbox SET attempts = attempts + 1, next_at = $1 WHERE id = $2",
            min(next_at, 1e300),
            event_id,
        )

    async def forget(self, names: Iterable[str]) -> list[str]:
        async with self._conn() as conn, conn.transaction():
            rows = await conn.fetch(
                f"DELETE FROM jobs WHERE name = ANY($1::text[]) AND state = ANY($2::text[]) "
                f"AND (lease_owner IS NULL OR lease_expires_at < {NOW}) RETURNING name",
                list(names),
                _TERMINAL,
            )
            gone = [r[0] for r in rows]
            for table in ("transitions", "cancel_requests"):
                await conn.execute(f"DELETE FROM {table} WHERE name = ANY($1::text[])", gone)
        return gone

    async def _execute(self, sql: str, *args: Any) -> None:
        async with self._conn() as conn:
            await conn.execute(sql, *args)

    # -------------------------------------------------------------------- reads

    async def load(self, names: Iterable[str] | None = None) -> dict[str, JobRecord]:
        async with self._conn() as conn:
            if names is None:
                rows = await conn.fetch(f"SELECT {_COLUMNS} FROM jobs")
            else:
                rows = await conn.fetch(
                    f"SELECT {_COLUMNS} FROM jobs WHERE name = ANY($1::text[])", list(names)
                )
        return {row[0]: _from_row(tuple(row)) for row in rows}

    async def history(self, name: str) -> list[Transition]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT name, old_state, new_state, at, detail FROM transitions "
                "WHERE name = $1 ORDER BY id",
                name,
            )
        return [_transition(r) for r in rows]

    async def cancel_requests(self) -> set[str]:
        async with self._conn() as conn:
            return {r[0] for r in await conn.fetch("SELECT name FROM cancel_requests")}

    async def find_dataset(self, content_key: str) -> SharedDataset | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                "SELECT content_key, dataset_id, s3_key FROM datasets WHERE content_key = $1",
                content_key,
            )
        return SharedDataset(*row) if row else None

    async def due_events(self, now: float, limit: int, since: float = 0.0) -> list[OutboxEvent]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT url, body, id, attempts, created_at FROM outbox WHERE delivered_at IS "
                "NULL AND next_at <= $1 AND created_at >= $2 ORDER BY id LIMIT $3",
                min(now, 1e300),
                since,
                limit,
            )
        return [OutboxEvent(*row) for row in rows]

    async def claim_events(self, limit: int) -> list[OutboxEvent]:
        # Held for a minute: a worker that dies while delivering hands its events on.
        async with self._conn() as conn:
            rows = await conn.fetch(
                """
                UPDATE outbox SET next_at = $1 + 60 WHERE id IN (
                    SELECT id FROM outbox WHERE delivered_at IS NULL AND next_at <= $1
                    ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
                RETURNING url, body, id, attempts, created_at
                """,
                time.time(),
                limit,
            )
        return sorted((OutboxEvent(*row) for row in rows), key=lambda e: e.id)

    async def undelivered(self) -> list[OutboxEvent]:
        return await self.due_events(math.inf, 1_000_000)

    async def load_estimates(self) -> dict[str, float]:
        async with self._conn() as conn:
            return dict(await conn.fetch("SELECT key, seconds FROM phase_estimates"))

    async def count_by_state(self) -> dict[str, int]:
        async with self._conn() as conn:
            return dict(await conn.fetch("SELECT state, count(*) FROM jobs GROUP BY state"))

    async def healthy(self) -> bool:
        try:
            async with self._conn() as conn:
                await conn.execute("SELECT 1")
        except StoreError:
            return False
        return True

    # ------------------------------------------------------------------- leases

    async def claim(self, names: Sequence[str], limit: int | None = None) -> dict[str, JobRecord]:
        if not names:
            return {}
        async with self._conn() as conn:
            rows = await conn.fetch(_CLAIM, list(names), self.worker, self.lease_ttl, limit)
        claimed = {}
        for row in rows:
            values = tuple(row)
            self._tokens[values[0]] = values[-1]
            claimed[values[0]] = _from_row(values[:-1])
        return claimed

    async def renew(self) -> set[str]:
        """Renews the leases this process knows it holds, by token: a row it owns but
        never learned of (a claim whose answer was lost) expires on its own."""
        before = dict(self._tokens)
        if not before:
            return set()
        names, tokens = list(before), list(before.values())
        rows = await self._retried(
            f"""
            WITH mine AS (
                SELECT jobs.name FROM jobs
                JOIN unnest($2::text[], $3::bigint[]) AS held(name, token)
                  ON jobs.name = held.name AND jobs.lease_token = held.token
                WHERE jobs.lease_owner = $1
                ORDER BY jobs.name FOR UPDATE OF jobs
            )
            UPDATE jobs SET lease_expires_at = {NOW} + $4 FROM mine
            WHERE jobs.name = mine.name RETURNING jobs.name
            """,
            self.worker,
            names,
            tokens,
            self.lease_ttl,
        )
        held = {row[0] for row in rows}
        # Lost: held before the renewal went out, not renewed, and still the same token
        # here (one ended or released meanwhile is not lost).
        lost = {n for n, t in before.items() if n not in held and self._tokens.get(n) == t}
        for name in lost:
            del self._tokens[name]
        return lost

    async def _retried(self, sql: str, *args: Any) -> list[Any]:
        """``fetch`` in a transaction of its own, again after a deadlock (a renewal and
        a group commit of the same worker lock the same rows): no one is halted for it."""
        for attempt in range(5):
            try:
                async with self._pool.acquire() as conn, conn.transaction():
                    return list(await conn.fetch(sql, *args))
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                await anyio.sleep(0.01 * (attempt + 1))
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                raise StoreError(f"{self.shown}: {_reason(exc)}") from None
        raise StoreError(f"{self.shown}: deadlocked five times in a row")

    async def release(self, names: Iterable[str] | None = None) -> None:
        chosen = list(self._tokens) if names is None else list(names)
        if not chosen:
            return
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL "
                "WHERE lease_owner = $1 AND name = ANY($2::text[])",
                self.worker,
                chosen,
            )
        for name in chosen:
            self._tokens.pop(name, None)

    def holds(self, name: str) -> bool:
        return name in self._tokens

    async def leases(self) -> dict[str, Lease]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"SELECT name, lease_owner, {NOW} - lease_claimed_at, lease_expires_at - {NOW} "
                "FROM jobs WHERE lease_owner IS NOT NULL"
            )
        return {name: Lease(worker, age, left) for name, worker, age, left in rows}

    async def wait_for_cancels(self, timeout: float) -> None:
        """LISTEN on a connection of its own; polling (``timeout``) covers a lost one."""
        if self._listener is None or self._listener.is_closed():
            try:
                self._listener = await asyncpg.connect(**self._connect)
                await self._listener.add_listener(CHANNEL, self._hint)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                self._listener = None
        with anyio.move_on_after(timeout):
            await self._cancel_hint.wait()
        self._cancel_hint = anyio.Event()

    def _hint(self, *_: Any) -> None:
        self._cancel_hint.set()


def _row(record: JobRecord, lease_token: int | None = None) -> dict[str, Any]:
    row = dict(zip(_FIELDS, _to_row(record), strict=True))
    row["lease_token"] = lease_token
    return row


def _json(rows: list[dict[str, Any]]) -> str:
    return orjson.dumps(rows).decode()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
