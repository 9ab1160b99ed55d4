"""The use cases the CLI and the daemon share: wiring a gateway's engine, running a
manifest as a batch (with signals), and cancelling jobs.

Every change to a job goes through an engine's driver and the transition table; the
CLI only parses flags and prints what these return.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import structlog

from orchestrator.engine import Engine, RunSummary
from orchestrator.errors import (
    AuthError,
    GatewayError,
    GatewayUnreachable,
    InputError,
    RetryableError,
    StoreError,
)
from orchestrator.gateway import GatewayClient
from orchestrator.lifecycle import CREATE_FINETUNE, JobRun, Lifecycle
from orchestrator.logs import Redactor
from orchestrator.manifest import JobSpec, Manifest, load_manifest
from orchestrator.metrics import Metrics
from orchestrator.notify import Notifier
from orchestrator.openai_api import FineTuningClient
from orchestrator.plan import PlannedJob, inspect_datasets, plan_in_chunks
from orchestrator.sessions import open_session
from orchestrator.settings import ClientSettings, EngineSettings
from orchestrator.states import JobRecord
from orchestrator.statuses import StatusMap, default_status_map
from orchestrator.store import (
    DEFAULT_LEASE_TTL,
    CheckpointStore,
    OwnerLock,
    StateLocation,
    open_store,
)
from orchestrator.upload import storage_client

log = structlog.get_logger("engine")


@dataclass(frozen=True)
class Gateway:
    """Where jobs are sent: a base URL, the key it takes and how (``auth``), and the
    headers every call carries besides."""

    base_url: str
    api_key: str = field(repr=False)
    auth: str = "portkey"
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def client(self, settings: ClientSettings, **options: Any) -> GatewayClient:
        """The finetune flow's client."""
        return GatewayClient(self.base_url, self.api_key, settings, **self._auth(), **options)

    def jobs_client(self, settings: ClientSettings, **options: Any) -> FineTuningClient:
        """The OpenAI-compatible flow's client."""
        return FineTuningClient(self.base_url, self.api_key, settings, **self._auth(), **options)

    def _auth(self) -> dict[str, Any]:
        return {"auth": self.auth, "headers": dict(self.headers)}


def gateway_of(manifest: Manifest) -> Gateway:
    """The gateway a manifest runs against, or a clear InputError."""
    if not manifest.base_url:
        raise InputError(
            f"{manifest.path}: no gateway: set gateway.base_url in the manifest or PORTKEY_BASE_URL"
        )
    if not manifest.api_key:
        raise InputError(
            f"{manifest.path}: no API key: set gateway.api_key in the manifest or PORTKEY_API_KEY"
        )
    return Gateway(manifest.base_url, manifest.api_key, manifest.auth, manifest.headers)


async def check_gateway(client: GatewayClient) -> None:
    """One cheap call before any work: a wrong URL or key is bad input, not 300 failed jobs."""
    where = client.identity
    try:
        await client.probe()
    except AuthError as exc:
        raise InputError(f"gateway {where} refused the API key (HTTP {exc.status})") from None
    except RetryableError as exc:
        detail = exc.message.removeprefix(f"gateway {where}: ")
        raise GatewayUnreachable(f"gateway {where}: {detail}") from None
    except GatewayError as exc:
        raise InputError(f"gateway {where}: {exc.message}") from None


async def check_dialects(
    apis: Iterable[str], client: GatewayClient, jobs: FineTuningClient
) -> None:
    """``check_gateway`` once for each API dialect the jobs use."""
    for api in sorted(set(apis)):
        await check_gateway(jobs if api == "fine_tuning" else client)


async def preflight(gateway: Gateway, settings: EngineSettings, apis: Iterable[str]) -> None:
    """``check_dialects`` with clients of their own, before anything is opened or stored."""
    async with (
        gateway.client(settings.client) as client,
        gateway.jobs_client(settings.client) as jobs,
    ):
        await check_dialects(apis, client, jobs)


@asynccontextmanager
async def open_engine(
    gateway: Gateway,
    statuses: StatusMap,
    store: CheckpointStore,
    settings: EngineSettings,
    metrics: Metrics,
    *,
    until: str = "done",
    preflight: bool = True,
    apis: Iterable[str] = ("finetune",),
    keep_finished: bool = True,
    redactor: Redactor | None = None,
    seed: int | None = None,
) -> AsyncIterator[Engine]:
    """An engine for ``gateway``; ``preflight`` probes it first in each of ``apis``."""
    rng = random.Random(seed)
    async with (
        gateway.client(settings.client, observer=metrics, rng=rng) as client,
        gateway.jobs_client(settings.client, observer=metrics, rng=rng) as jobs,
        storage_client(settings.upload) as storage,
    ):
        if preflight:
            await check_dialects(apis, client, jobs)
        lc = Lifecycle(
            client=client,
            jobs=jobs,
            storage=storage,
            store=store,
            statuses=statuses,
            settings=settings,
            metrics=metrics,
            upload_slots=anyio.Semaphore(settings.upload.concurrency, fast_acquire=True),
            small_upload_slots=anyio.Semaphore(
                settings.upload.small_concurrency, fast_acquire=True
            ),
            rng=rng,
            redact=redactor.text if redactor else str,
        )
        engine = Engine(lc, until=until, keep_finished=keep_finished)
        try:
            yield engine
        finally:
            if store.shared:  # an engine retired early (the daemon's) gives back its jobs
                with anyio.CancelScope(shield=True):
                    try:
                        await store.release([n for n in engine.runs if store.holds(n)])
                    except StoreError:
                        pass  # they expire by themselves


# ---------------------------------------------------------------- notifications


@dataclass(frozen=True)
class Notifications:
    """Where job events go besides each manifest's ``notify:``, and the secret that signs
    them (never stored)."""

    urls: tuple[str, ...] = ()
    secret: bytes | None = None

    def apply(self, manifest: Manifest) -> Manifest:
        """The manifest with these URLs added to every job; an InputError when some job
        has URLs to tell and there is no secret to sign with."""
        jobs = tuple(replace(job, notify=(*job.notify, *self.urls)) for job in manifest.jobs)
        if self.secret is None and any(job.notify for job in jobs):
            raise InputError(
                f"{manifest.path}: notifications need a secret to sign them: "
                "--notify-secret-file FILE or ORCHESTRATOR_NOTIFY_SECRET"
            )
        return replace(manifest, jobs=jobs)

    @asynccontextmanager
    async def notifier(self, store: CheckpointStore) -> AsyncIterator[Notifier | None]:
        """A notifier for ``store``'s outbox, with a session of its own (None without a
        secret: the events wait in the outbox for a run that has one)."""
        if self.secret is None:
            yield None
            return
        session = open_session(ClientSettings(connect_timeout=10.0, read_timeout=30.0))
        try:
            yield Notifier(store, session, self.secret)
        finally:
            await session.aclose()


# ------------------------------------------------------------------------- run


@dataclass
class BatchResult:
    summary: RunSummary
    planned: list[PlannedJob]


async def run_manifest(
    manifest_path: Path,
    state: StateLocation,
    *,
    until: str,
    retry_failed: bool,
    replace: Sequence[str],
    settings: EngineSettings,
    redactor: Redactor,
    live: bool,
    notify: Notifications | None = None,
    lease_ttl: float = DEFAULT_LEASE_TTL,
) -> BatchResult:
    """``orchestrator run``: plan every job against the store, then drive them (with a
    shared store, the jobs no other worker drives, following the others to their end).
    Bad input (manifest, datasets, URL, key) raises ``InputError`` before anything is
    stored or sent."""
    notify = notify or Notifications()
    manifest = notify.apply(load_manifest(manifest_path))
    redactor.add_secret(manifest.api_key)
    for _, value in manifest.headers:
        redactor.add_secret(value)
    gateway = gateway_of(manifest)
    unknown = set(replace) - {j.name for j in manifest.jobs}
    if unknown:
        raise InputError(f"--replace {sorted(unknown)[0]}: no such job in {manifest_path}")
    reports = await inspect_datasets(manifest.jobs, settings.check)
    for report in reports.values():
        for warning in report.warnings[:5]:
            structlog.get_logger("datasets").warning("dataset warning", warning=warning)
    redactor.add_secret(state.password())
    owner = None if state.is_database else OwnerLock(state.path)
    planned: list[PlannedJob] = []  # every plan, as the engine takes it
    async with AsyncExitStack() as stack:
        if owner is not None:
            owner.acquire()  # one run or daemon per SQLite file
            stack.callback(owner.release)

        async def opened() -> CheckpointStore:
            return await stack.enter_async_context(
                open_store(state, owner=owner, lease_ttl=lease_ttl)
            )

        # A new state file is created only after the preflight.
        store = await opened() if await anyio.to_thread.run_sync(state.exists) else None
        chunks = plan_in_chunks(
            manifest.jobs,
            reports,
            store.load if store else _no_records,
            retry_failed=retry_failed,
            replace=replace,
        )
        # Plan until a job needs the gateway: then one preflight, before anything is
        # stored (a bad URL or key stores nothing, not even a new state file).
        ahead: list[list[PlannedJob]] = []
        async for chunk in chunks:
            ahead.append(chunk)
            if any(p.action.calls_gateway for p in chunk):
                await preflight(gateway, settings, (job.api for job in manifest.jobs))
                break

        async def every_chunk() -> AsyncIterator[list[PlannedJob]]:
            for chunk in ahead:
                planned.extend(chunk)
                yield chunk
            async for chunk in chunks:
                planned.extend(chunk)
                yield chunk

        store = store or await opened()
        started = time.time()
        try:
            async with (
                open_engine(
                    gateway,
                    manifest.statuses,
                    store,
                    settings,
                    Metrics(),
                    until=until,
                    preflight=False,
                    redactor=redactor,
                ) as engine,
                notify.notifier(store) as notifier,
                anyio.create_task_group() as delivery,
            ):
                if notifier is not None:
                    delivery.start_soon(notifier.serve)
                summary = await drive_with_signals(
                    engine, every_chunk(), settings.shutdown_grace, live
                )
                if notifier is not None and not summary.interrupted:
                    await notifier.drain(settings.notify_grace, since=started)
                delivery.cancel_scope.cancel()
        except* StoreError as failed:  # mid-run: what was committed stays committed
            summary = RunSummary(broken=str(failed.exceptions[0]))
    return BatchResult(summary, planned)


async def _no_records(names: list[str]) -> dict[str, JobRecord]:
    return {}


async def drive_with_signals(
    engine: Engine, planned: AsyncIterable[list[PlannedJob]], grace: float, live: bool
) -> RunSummary:
    """Run the batch; the first SIGINT/SIGTERM stops new steps, a second (or the grace
    period running out) cancels what is still in flight."""
    result: list[RunSummary] = []

    async def batch(scope: anyio.CancelScope) -> None:
        result.append(await engine.run_batch(planned))
        scope.cancel()

    async def signals(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
            async for _ in received:
                if engine.stopping:
                    scope.cancel()
                    continue  # keep receiving: a third signal is not a traceback either
                log.warning("stopping; finishing calls in flight")
                engine.stop()
                scope.deadline = anyio.current_time() + grace

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(signals, tg.cancel_scope)
            tg.start_soon(batch, tg.cancel_scope)

    if live:
        from rich.console import Console
        from rich.live import Live

        from orchestrator.view import live_renderable

        with Live(
            get_renderable=lambda: live_renderable(engine),
            console=Console(stderr=True),
            refresh_per_second=4,
            transient=False,
        ):
            await body()
    else:
        await body()
    if result:
        return result[0]
    summary = RunSummary(interrupted=True, fatal=engine.fatal, broken=engine.broken)
    for name, run in engine.runs.items():
        summary.states[name] = run.record.state
        if run.record.error and run.record.state.value == "failed":
            summary.errors[name] = run.record.error
    return summary


# ---------------------------------------------------------------------- cancel


@dataclass(frozen=True)
class CancelOutcome:
    name: str
    state: str
    message: str  # what the user reads after "NAME: "


async def cancel_jobs(
    state: StateLocation,
    names: Sequence[str],
    *,
    cancel_all: bool,
    manifest_path: Path | None,
    settings: EngineSettings,
    redactor: Redactor,
    wait: float,
) -> list[CancelOutcome]:
    """``orchestrator cancel``: the request goes into the store (the control plane), where
    each job's driver, in whichever process, applies it. The jobs nobody drives (no
    engine runs, or their worker went quiet) this process claims and cancels itself,
    through the same lifecycle step."""
    redactor.add_secret(state.password())
    async with open_store(state) as store:
        records = await store.load(None if cancel_all else names)
        for name in names:
            if name not in records:
                raise InputError(f"no such job in {state}: {name}")
        outcomes = [
            CancelOutcome(r.name, r.state.value, f"already {r.state.value}; nothing to cancel")
            for r in sorted(records.values(), key=lambda r: r.name)
            if r.state.terminal and not cancel_all
        ]
        targets = sorted(
            (r for r in records.values() if not r.state.terminal), key=lambda r: r.name
        )
        if not targets:
            return outcomes
        claimed = await store.claim([r.name for r in targets])
        ours = [claimed[r.name] for r in targets if r.name in claimed]
        groups = _cancel_gateways(ours, manifest_path, redactor) if ours else {}
        await store.request_cancel(r.name for r in targets)
        with anyio.move_on_after(wait):
            for (gateway, statuses), records_there in groups.items():
                await _drive_cancels(gateway, statuses, records_there, store, settings, redactor)
            await _wait_for_end(store, [r.name for r in targets if r.name not in claimed])
        final = await store.load([r.name for r in targets])
        for record in sorted(final.values(), key=lambda r: r.name):
            state_now = record.state.value
            lost = next((r for r in targets if r.name == record.name), record)
            if not record.state.terminal:
                note = (
                    "not confirmed yet (the next run applies it)"
                    if record.name in claimed
                    else "the running engine applies it"
                )
                message = f"{state_now} (requested; {note})"
            elif lost.intent == CREATE_FINETUNE and not lost.finetune_id and not record.finetune_id:
                message = (
                    f"{state_now} (its create's answer was lost: a finetune may exist on the "
                    "gateway; a run of its manifest would find it)"
                )
            elif state_now == "failed":
                message = f"failed before the cancel: {record.error}"
            elif state_now == "succeeded":
                message = f"succeeded before the cancel ({record.fine_tuned_model})"
            else:
                message = state_now
            outcomes.append(CancelOutcome(record.name, state_now, message))
        return outcomes


def _cancel_gateways(
    targets: Sequence[JobRecord], manifest_path: Path | None, redactor: Redactor
) -> dict[tuple[Gateway, StatusMap], list[tuple[JobRecord, JobSpec | None]]]:
    """Each job's gateway and key (from ``--manifest``, else the environment, else the
    manifest the job was recorded from) and its spec where a manifest still has it."""
    given = load_manifest(manifest_path) if manifest_path else None
    env_key, env_url = os.environ.get("PORTKEY_API_KEY"), os.environ.get("PORTKEY_BASE_URL")
    recorded: dict[str, Manifest | None] = {}
    groups: dict[tuple[Gateway, StatusMap], list[tuple[JobRecord, JobSpec | None]]] = {}
    for record in targets:
        manifest = given
        if manifest is None and record.manifest:
            if record.manifest not in recorded:
                recorded[record.manifest] = _try_manifest(Path(record.manifest))
            manifest = recorded[record.manifest]
        base_url = _first(
            given.base_url if given else None, env_url, manifest.base_url if manifest else None
        )
        api_key = _first(
            given.api_key if given else None, env_key, manifest.api_key if manifest else None
        )
        redactor.add_secret(api_key)
        if record.finetune_id and not api_key:
            raise InputError(
                f"cancel {record.name} needs the gateway's API key: set PORTKEY_API_KEY "
                "or pass --manifest"
            )
        statuses = manifest.statuses if manifest else default_status_map()
        auth, headers = (manifest.auth, manifest.headers) if manifest else ("portkey", ())
        for _, value in headers:
            redactor.add_secret(value)
        gateway = Gateway(base_url or record.base_url, api_key or "", auth, headers)
        spec = next((j for j in manifest.jobs if j.name == record.name), None) if manifest else None
        if spec is not None and spec.fingerprint(record.content_sha256) != record.fingerprint:
            spec = None  # edited since: its body is not the one the create was sent with
        groups.setdefault((gateway, statuses), []).append((record, spec))
    return groups


def _first(*values: str | None) -> str | None:
    return next((value for value in values if value), None)


def _try_manifest(path: Path) -> Manifest | None:
    try:
        return load_manifest(path)
    except InputError:
        return None


async def _drive_cancels(
    gateway: Gateway,
    statuses: StatusMap,
    records: Sequence[tuple[JobRecord, JobSpec | None]],
    store: CheckpointStore,
    settings: EngineSettings,
    redactor: Redactor,
) -> None:
    async with (
        open_engine(
            gateway, statuses, store, settings, Metrics(), preflight=False, redactor=redactor
        ) as engine,
        anyio.create_task_group() as tg,
    ):
        runs = []
        for record, known in records:
            spec = known or JobSpec(
                record.name, record.provider, record.model, "", {}, None, None, None
            )
            run = JobRun(spec, record, cancel_requested=True)
            if known is None and record.api == "finetune":
                # Without the spec it was sent with, a create whose answer was lost cannot
                # be replayed: cancelled here, and the outcome says a finetune may exist.
                # (A fine_tuning job is found by its tags, which need only the record.)
                run.unsent_intent = CREATE_FINETUNE
            engine.runs[record.name] = run
            runs.append(run)
        await engine.start(tg, runs)


async def _wait_for_end(store: CheckpointStore, names: list[str]) -> None:
    while names:
        fresh = await store.load(names)
        if all(r.state.terminal for r in fresh.values()):
            return
        await anyio.sleep(0.2)
