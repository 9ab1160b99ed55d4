"""The command line: ``run``, ``plan``, ``validate``, ``status``, ``cancel``, ``daemon``,
``sim`` and ``demo``. Bad input is one line on stderr and exit code 2, never a traceback.

A command imports the engine, the manifest parser and the HTTP stack when it needs them,
not at start: ``status`` reads only the state file and starts in a third of the time.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import signal
import sys
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import fields, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import click
import structlog

from orchestrator.errors import ConflictError, GatewayError, InputError, OrchestratorError
from orchestrator.logs import Redactor, configure_logging
from orchestrator.metrics import Metrics
from orchestrator.settings import (
    HTTP_CLIENTS,
    CheckSettings,
    EngineSettings,
    HttpClient,
    PollSettings,
    UploadSettings,
)
from orchestrator.states import JobRecord, State, Transition
from orchestrator.store import OwnerLock, SqliteStore

if TYPE_CHECKING:
    from orchestrator.engine import Engine, RunSummary
    from orchestrator.manifest import Manifest
    from orchestrator.plan import PlannedJob

DEFAULT_STATE = Path(".orchestrator") / "state.db"
T = TypeVar("T")

state_option = click.option(
    "--state",
    "state_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="ORCHESTRATOR_STATE",
    default=DEFAULT_STATE,
    show_default=True,
    help="SQLite state file (or ORCHESTRATOR_STATE).",
)
verbose_option = click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="Log every transition (default: uploads, validation, training and the end).",
)


def _settings_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--upload-concurrency",
            type=click.IntRange(1, 256),
            default=4,
            show_default=True,
            help="Uploads of large files (16 MiB and over) at once.",
        ),
        click.option(
            "--api-concurrency",
            type=click.IntRange(1, 1024),
            default=64,
            show_default=True,
            help="Gateway requests (and job steps) in flight at once.",
        ),
        click.option(
            "--poll-interval",
            type=click.FloatRange(0.01),
            default=2.0,
            show_default=True,
            help="First status poll after a phase starts (s).",
        ),
        click.option(
            "--poll-max",
            type=click.FloatRange(0.01),
            default=60.0,
            show_default=True,
            help="Longest wait between status polls (s).",
        ),
        click.option(
            "--min-examples",
            type=click.IntRange(1),
            default=10,
            show_default=True,
            help="Fewest examples a dataset may have.",
        ),
        click.option(
            "--requests-per-second",
            type=click.FloatRange(0.1),
            default=None,
            help="Cap on gateway requests per second (default: no cap).",
        ),
        click.option(
            "--http-client",
            type=click.Choice(HTTP_CLIENTS),
            default="aiohttp",
            show_default=True,
            help="What carries gateway requests; `make bench` compares their CPU cost.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _settings(
    upload_concurrency: int,
    api_concurrency: int,
    poll_interval: float,
    poll_max: float,
    min_examples: int,
    requests_per_second: float | None = None,
    http_client: HttpClient = "aiohttp",
) -> EngineSettings:
    base = EngineSettings()
    return replace(
        base,
        client=replace(
            base.client,
            max_connections=api_concurrency,
            max_keepalive=api_concurrency,
            requests_per_second=requests_per_second,
            http_client=http_client,
        ),
        step_concurrency=api_concurrency,
        upload=replace(UploadSettings(), concurrency=upload_concurrency),
        poll=replace(PollSettings(), initial=poll_interval, maximum=max(poll_max, poll_interval)),
        check=replace(CheckSettings(), min_examples=min_examples),
    )


def _run_async(fn: Callable[[], Awaitable[T]]) -> T:
    # uvloop where it is installed (not on Windows): 12% less CPU on a 1,000-job run.
    uvloop = importlib.util.find_spec("uvloop") is not None
    return anyio.run(fn, backend_options={"use_uvloop": uvloop})


def _logging(redactor: Redactor, quiet: bool = False, verbose: bool = False) -> None:
    import logging

    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    configure_logging(redactor, level=level)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="finetune-orchestrator")
def cli() -> None:
    """Drive fine-tune jobs from a YAML manifest through the fine-tuning gateway."""


# ------------------------------------------------------------------------ run


@cli.command()
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(path_type=Path))
@state_option
@click.option(
    "--until",
    type=click.Choice(["submitted", "done"]),
    default="done",
    show_default=True,
    help="submitted: stop once training has started.",
)
@click.option("--retry-failed", is_flag=True, help="Try failed jobs again even if unchanged.")
@click.option(
    "--replace",
    "replace_names",
    multiple=True,
    metavar="NAME",
    help="Start NAME afresh although its spec changed (repeatable).",
)
@click.option("--live/--no-live", default=None, help="Live view (default: when a terminal).")
@verbose_option
@_settings_options
def run(
    manifest_path: Path,
    state_path: Path,
    until: str,
    retry_failed: bool,
    replace_names: tuple[str, ...],
    live: bool | None,
    verbose: bool,
    **settings_kw: Any,
) -> None:
    """Advance every job of MANIFEST; a rerun resumes where the last one stopped."""
    settings = _settings(**settings_kw)
    show_live = sys.stderr.isatty() if live is None else live
    redactor = Redactor()
    _logging(redactor, quiet=show_live, verbose=verbose)
    code = _run_async(
        lambda: _run(
            manifest_path,
            state_path,
            until,
            retry_failed,
            replace_names,
            settings,
            show_live,
            redactor,
        )
    )
    sys.exit(code)


async def _run(
    manifest_path: Path,
    state_path: Path,
    until: str,
    retry_failed: bool,
    replace_names: Sequence[str],
    settings: EngineSettings,
    live: bool,
    redactor: Redactor,
) -> int:
    from orchestrator.manifest import load_manifest
    from orchestrator.plan import inspect_datasets, plan_in_chunks
    from orchestrator.runner import gateway_of, open_engine, preflight

    manifest = load_manifest(manifest_path)
    redactor.add_secret(manifest.api_key)
    gateway_of(manifest)
    unknown = set(replace_names) - {j.name for j in manifest.jobs}
    if unknown:
        raise InputError(f"--replace {sorted(unknown)[0]}: no such job in {manifest_path}")
    reports = await inspect_datasets(manifest.jobs, settings.check)
    log = structlog.get_logger("datasets")
    for report in reports.values():
        for warning in report.warnings[:5]:
            log.warning("dataset warning", warning=warning)
    lock = OwnerLock(state_path)
    lock.acquire()
    planned: list[PlannedJob] = []  # every plan, as the engine takes it
    store: SqliteStore | None = None
    try:
        if await anyio.Path(state_path).exists():
            store = SqliteStore(state_path)  # a new one is created only after the preflight
        chunks = plan_in_chunks(
            manifest.jobs,
            reports,
            store.load if store else _no_records,
            retry_failed=retry_failed,
            replace=replace_names,
        )
        # Plan until a job needs the gateway: then one preflight, before anything is
        # stored (a bad URL or key stores nothing, not even a new state file).
        ahead: list[list[PlannedJob]] = []
        async for chunk in chunks:
            ahead.append(chunk)
            if any(p.action.calls_gateway for p in chunk):
                await preflight(manifest, settings)
                break

        async def every_chunk() -> AsyncIterator[list[PlannedJob]]:
            for chunk in ahead:
                planned.extend(chunk)
                yield chunk
            async for chunk in chunks:
                planned.extend(chunk)
                yield chunk

        store = store or SqliteStore(state_path)
        async with open_engine(
            manifest, store, settings, Metrics(), until=until, preflight=False
        ) as engine:
            summary = await _drive(engine, every_chunk(), settings.shutdown_grace, live)
    finally:
        if store is not None:
            store.close()
        lock.release()
    _print_summary(summary, planned)
    if summary.fatal:
        raise InputError(summary.fatal)
    return summary.exit_code(until)


async def _no_records(names: list[str]) -> dict[str, JobRecord]:
    return {}


async def _load_records(state_path: Path, names: Sequence[str]) -> dict[str, JobRecord]:
    """The stored records of ``names``; an absent state file is not created here."""
    if not await anyio.Path(state_path).exists():
        return {}
    store = SqliteStore(state_path)
    try:
        return await store.load(names)
    finally:
        store.close()


async def _drive(
    engine: Engine, planned: AsyncIterable[list[PlannedJob]], grace: float, live: bool
) -> RunSummary:
    """Run the batch; the first SIGINT/SIGTERM stops new steps, a second (or the grace
    period running out) cancels what is still in flight."""
    from orchestrator.engine import RunSummary

    result: list[RunSummary] = []

    async def batch(scope: anyio.CancelScope) -> None:
        result.append(await engine.run_batch(planned))
        scope.cancel()

    async def signals(scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
            async for _ in received:
                if engine.stopping:
                    scope.cancel()
                    return
                structlog.get_logger("engine").warning("stopping; finishing calls in flight")
                engine.stop()
                scope.deadline = anyio.current_time() + grace

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(batch, tg.cancel_scope)
            tg.start_soon(signals, tg.cancel_scope)

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
    summary = RunSummary(interrupted=True, fatal=engine.fatal)
    summary.states = {name: run.record.state for name, run in engine.runs.items()}
    return summary


def _print_summary(summary: RunSummary, planned: list[PlannedJob]) -> None:
    from orchestrator.plan import Action

    counts = summary.counts()
    line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    click.echo(f"{len(summary.states)} jobs: {line or 'none'}")
    for plan in planned:
        if plan.action is Action.CHANGED:
            click.echo(f"  {plan.spec.name}: {plan.describe()}")
    if summary.interrupted:
        click.echo("interrupted: run the same command again to resume", err=True)


# ----------------------------------------------------------------------- plan


@cli.command()
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(path_type=Path))
@state_option
@click.option("--retry-failed", is_flag=True)
@click.option("--replace", "replace_names", multiple=True, metavar="NAME")
@click.option("--min-examples", type=click.IntRange(1), default=10, show_default=True)
def plan(
    manifest_path: Path,
    state_path: Path,
    retry_failed: bool,
    replace_names: tuple[str, ...],
    min_examples: int,
) -> None:
    """Show what `run` would do with each job, without any network call."""
    from orchestrator.manifest import load_manifest
    from orchestrator.plan import inspect_datasets, plan_jobs
    from orchestrator.view import text_table

    async def go() -> list[PlannedJob]:
        manifest = load_manifest(manifest_path)
        reports = await inspect_datasets(manifest.jobs, CheckSettings(min_examples=min_examples))
        records = await _load_records(state_path, [j.name for j in manifest.jobs])
        return plan_jobs(
            manifest.jobs, reports, records, retry_failed=retry_failed, replace=replace_names
        )

    planned = _run_async(go)
    click.echo(
        text_table(
            ("job", "action", "detail"),
            [(p.spec.name, p.action.value, p.describe()) for p in planned],
        )
    )


# ------------------------------------------------------------------- validate


@cli.command()
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(path_type=Path))
@click.option("--min-examples", type=click.IntRange(1), default=10, show_default=True)
def validate(manifest_path: Path, min_examples: int) -> None:
    """Check MANIFEST and every local dataset it names; exit 2 on any problem."""
    import time

    from orchestrator.manifest import load_manifest
    from orchestrator.plan import inspect_datasets

    started = time.monotonic()

    async def go() -> tuple[Manifest, dict[Path, Any]]:
        manifest = load_manifest(manifest_path)
        reports = await inspect_datasets(manifest.jobs, CheckSettings(min_examples=min_examples))
        return manifest, reports

    manifest, reports = _run_async(go)
    elapsed = time.monotonic() - started
    total = sum(r.size for r in reports.values())
    errors = [e for r in reports.values() for e in r.errors]
    for r in reports.values():
        for warning in r.warnings:
            click.echo(f"warning: {warning}", err=True)
    for error in errors:
        click.echo(f"error: {error}", err=True)
    if errors:
        sys.exit(2)
    rate = total / elapsed / 1e6 if elapsed > 0 else 0.0
    click.echo(
        f"ok: {len(manifest.jobs)} jobs, {len(reports)} datasets, "
        f"{total / 1e6:.1f} MB checked at {rate:.0f} MB/s"
    )


# --------------------------------------------------------------------- status


@cli.command()
@state_option
@click.option("--json", "as_json", is_flag=True, help="A JSON array instead of a table.")
@click.option("--history", is_flag=True, help="Every transition of the named jobs.")
@click.argument("names", nargs=-1)
def status(state_path: Path, as_json: bool, history: bool, names: tuple[str, ...]) -> None:
    """Show jobs from the state file (works beside a running engine)."""
    from orchestrator.view import text_table

    if not state_path.exists():
        raise InputError(f"{state_path}: no state file (run a manifest first, or pass --state)")

    async def go() -> tuple[list[Any], dict[str, list[Transition]]]:
        store = SqliteStore(state_path)
        try:
            records = await store.load(names or None)
            histories = {n: await store.history(n) for n in names} if history else {}
        finally:
            store.close()
        return sorted(records.values(), key=lambda r: r.name), histories

    records, histories = _run_async(go)
    missing = [n for n in names if n not in {r.name for r in records}]
    if as_json:
        click.echo(json.dumps([r.public() for r in records], indent=2))
    else:
        headers = ["job", "state", "remote status", "dataset", "finetune", "model / error"]
        abandoned = any(r.abandoned_datasets for r in records)
        if abandoned:  # datasets left behind by expired URLs or restarts
            headers.append("abandoned datasets")
        rows = []
        for r in records:
            row = [
                r.name,
                r.state.value,
                r.remote_status,
                r.dataset_id,
                r.finetune_id,
                r.fine_tuned_model or r.error,
            ]
            if abandoned:
                row.append(", ".join(r.abandoned_datasets) or None)
            rows.append(row)
        click.echo(text_table(headers, rows))
        for name, transitions in histories.items():
            click.echo(f"\n{name}:")
            for t in transitions:
                click.echo(
                    f"  {_iso(t.at)}  {t.old.value if t.old else '-'} -> {t.new.value}"
                    + (f"  ({t.detail})" if t.detail else "")
                )
    if missing:
        raise InputError(f"no such job in {state_path}: {', '.join(missing)}")


def _iso(ts: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# --------------------------------------------------------------------- cancel


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--all", "cancel_all", is_flag=True, help="Every job that has not ended.")
@state_option
@click.option(
    "--manifest",
    "manifest_path",
    type=click.Path(path_type=Path),
    help="Take the gateway URL and API key from this manifest.",
)
@click.option(
    "--wait",
    type=click.FloatRange(0),
    default=15.0,
    show_default=True,
    help="Seconds to wait for a running engine to record the cancel.",
)
def cancel(
    names: tuple[str, ...],
    cancel_all: bool,
    state_path: Path,
    manifest_path: Path | None,
    wait: float,
) -> None:
    """Cancel jobs on the gateway and in the state file, with or without a running engine.

    The API key comes from --manifest, else PORTKEY_API_KEY; it is never stored."""
    if bool(names) == cancel_all:
        raise click.UsageError("name the jobs to cancel, or pass --all")
    if not state_path.exists():
        raise InputError(f"{state_path}: no state file")
    redactor = Redactor()
    _logging(redactor, quiet=True)
    api_key, base_override = os.environ.get("PORTKEY_API_KEY"), os.environ.get("PORTKEY_BASE_URL")
    if manifest_path is not None:
        from orchestrator.manifest import load_manifest

        manifest = load_manifest(manifest_path)
        api_key, base_override = manifest.api_key or api_key, manifest.base_url or base_override
    redactor.add_secret(api_key)
    code = _run_async(lambda: _cancel(state_path, names, cancel_all, api_key, base_override, wait))
    sys.exit(code)


async def _cancel(
    state_path: Path,
    names: Sequence[str],
    cancel_all: bool,
    api_key: str | None,
    base_override: str | None,
    wait: float,
) -> int:
    from orchestrator.gateway import GatewayClient

    store = SqliteStore(state_path)
    try:
        records = await store.load(None if cancel_all else names)
        for name in names:
            if name not in records:
                raise InputError(f"no such job in {state_path}: {name}")
        targets = []
        for record in sorted(records.values(), key=lambda r: r.name):
            if record.state.terminal:
                if not cancel_all:
                    click.echo(f"{record.name}: already {record.state.value}; nothing to cancel")
                continue
            targets.append(record)
        if not targets:
            return 0
        remote = [r for r in targets if r.finetune_id]
        if remote and not api_key:
            raise InputError("cancel needs the API key: set PORTKEY_API_KEY or pass --manifest")
        await store.request_cancel(r.name for r in targets)
        refused: set[str] = set()  # already finished on the gateway (409)
        by_gateway: dict[str, list[JobRecord]] = {}
        for record in remote:
            by_gateway.setdefault(base_override or record.base_url, []).append(record)
        for base_url, records_there in by_gateway.items():
            assert api_key is not None
            async with GatewayClient(base_url, api_key) as client:
                for record in records_there:
                    assert record.finetune_id is not None
                    try:
                        await client.cancel_finetune(record.finetune_id)
                    except ConflictError as exc:
                        refused.add(record.name)
                        click.echo(f"{record.name}: the gateway says {exc.message}")
                    except GatewayError as exc:
                        raise InputError(
                            f"cannot cancel {record.name} on {base_url}: {exc}"
                        ) from None
        lock = OwnerLock(state_path)
        if not lock.held_by_other():
            lock.acquire()  # no engine: record the cancel ourselves
            try:
                fresh = await store.load([r.name for r in targets])
                for record in fresh.values():
                    # A finetune the gateway says has finished is not marked cancelled:
                    # the next `run` observes and records how it really ended.
                    if not record.state.terminal and record.name not in refused:
                        done = record.evolve(state=State.CANCELLED, intent=None, next_poll_at=None)
                        await store.save(
                            done,
                            Transition(
                                record.name,
                                record.state,
                                State.CANCELLED,
                                done.updated_at,
                                "cancelled from the CLI",
                            ),
                        )
                    await store.clear_cancel(record.name)
            finally:
                lock.release()
        else:
            with anyio.move_on_after(wait):
                while True:
                    fresh = await store.load([r.name for r in targets])
                    if all(r.state.terminal for r in fresh.values()):
                        break
                    await anyio.sleep(0.2)
        final = await store.load([r.name for r in targets])
        for record in sorted(final.values(), key=lambda r: r.name):
            if record.state.terminal:
                note = ""
            elif record.name in refused:
                note = " (already finished on the gateway; the next run records how)"
            else:
                note = " (requested; the running engine applies it)"
            click.echo(f"{record.name}: {record.state.value}{note}")
        return 0
    finally:
        store.close()


# --------------------------------------------------------------------- daemon


@cli.command()
@click.option(
    "--watch",
    "watch_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of *.yaml / *.yml manifests.",
)
@state_option
@click.option(
    "--listen",
    default="127.0.0.1:9464",
    show_default=True,
    help="HOST:PORT for /healthz, /metrics and /jobs (port 0 picks one).",
)
@click.option(
    "--rescan",
    type=click.FloatRange(0.1),
    default=30.0,
    show_default=True,
    help="Seconds between full rescans of the folder, besides file events.",
)
@click.option("--force-polling", is_flag=True, help="Poll the folder instead of file events.")
@click.option(
    "--shutdown-grace",
    type=click.FloatRange(0),
    default=10.0,
    show_default=True,
    help="Seconds in-flight steps get to finish on SIGTERM/SIGINT.",
)
@verbose_option
@_settings_options
def daemon(
    watch_dir: Path,
    state_path: Path,
    listen: str,
    rescan: float,
    force_polling: bool,
    shutdown_grace: float,
    verbose: bool,
    **settings_kw: Any,
) -> None:
    """Watch a folder of manifests and drive their jobs until SIGTERM."""
    from orchestrator.daemon import Daemon, parse_listen

    address = parse_listen(listen)
    if not watch_dir.is_dir():
        raise InputError(f"--watch {watch_dir}: not a folder")
    settings = replace(_settings(**settings_kw), shutdown_grace=shutdown_grace)
    redactor = Redactor()
    _logging(redactor, verbose=verbose)
    # Every manifest's key is registered as it loads; the environment's one now.
    redactor.add_secret(os.environ.get("PORTKEY_API_KEY"))
    lock = OwnerLock(state_path)
    lock.acquire()
    try:
        store = SqliteStore(state_path)
        try:
            service = Daemon(
                watch_dir,
                store,
                settings,
                Metrics(),
                listen=address,
                rescan_interval=rescan,
                force_polling=force_polling,
                redactor=redactor,
            )
            _run_async(service.run)
        finally:
            store.close()
    finally:
        lock.release()


# ------------------------------------------------------------------------ sim


def _sim_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    # The config module alone: the simulator's server (aiohttp.web) loads only for `sim`.
    from orchestrator.simulator.config import SimConfig

    for f in reversed(fields(SimConfig)):
        default = getattr(SimConfig(), f.name)
        fn = click.option(
            f"--{f.name.replace('_', '-')}",
            f.name,
            type=type(default),
            default=default,
            show_default=f.name != "api_key",
        )(fn)
    return fn


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True, help="0 picks a free port.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where uploaded objects are kept (default: a temporary folder).",
)
@_sim_options
def sim(host: str, port: int, data_dir: Path | None, **config: Any) -> None:
    """Run the gateway simulator. The first line printed says where it listens."""
    import asyncio

    from orchestrator.simulator import SimConfig
    from orchestrator.simulator.server import serve_forever

    try:
        asyncio.run(serve_forever(SimConfig(**config), host, port, data_dir))
    except KeyboardInterrupt:
        pass


# ----------------------------------------------------------------------- demo


@cli.command()
@click.option(
    "--manifest",
    "manifest_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Default: configs/examples/manifest.yaml of this checkout.",
)
def demo(manifest_path: Path | None) -> None:
    """Start the simulator and run the example manifest against it."""
    import tempfile

    from orchestrator.simulator import SimConfig, running_simulator

    root = Path(__file__).resolve().parent.parent
    manifest_path = manifest_path or root / "configs" / "examples" / "manifest.yaml"
    if not manifest_path.exists():
        raise InputError(f"{manifest_path}: example manifest not found")
    config = SimConfig(validation_seconds=2.0, queue_seconds=1.0, training_seconds=3.0, seed=7)
    with running_simulator(config) as simulator, tempfile.TemporaryDirectory() as tmp:
        s3_dir = manifest_path.parent / "s3"
        # Objects that the example's s3_key jobs expect to find already in the bucket.
        for path in sorted(s3_dir.rglob("*.jsonl")) if s3_dir.exists() else []:
            key = str(path.relative_to(s3_dir))
            simulator.call(partial(simulator.simulator.preload, key, path))
        os.environ["PORTKEY_BASE_URL"] = simulator.url
        os.environ["PORTKEY_API_KEY"] = config.api_key
        state = Path(tmp) / "state.db"
        click.echo(f"simulator on {simulator.url}; running {manifest_path}\n")
        settings = _settings(4, 64, 0.5, 2.0, 10)
        redactor = Redactor()
        redactor.add_secret(config.api_key)
        live = sys.stderr.isatty()
        _logging(redactor, quiet=live)
        code = _run_async(
            lambda: _run(manifest_path, state, "done", False, (), settings, live, redactor)
        )
        click.echo("")
        ctx = click.get_current_context()
        ctx.invoke(status, state_path=state, as_json=False, history=False, names=())
        click.echo(
            "\n(two jobs fail on purpose: one dataset fails the local checks, one is "
            "rejected by the simulated provider)"
        )
    sys.exit(0 if code in (0, 1) else code)


# ----------------------------------------------------------------------- main


def _tune_gc() -> None:
    """Fewer cyclic collections: a 10,000-job manifest or state file is hundreds of
    thousands of short-lived objects, and with the default thresholds the collector
    took 40% of parsing it and 10% of a 1,000-job run's CPU (`make bench`). Everything
    imported so far is frozen out of the collector's reach; cycles are still collected,
    every 50,000 allocations instead of every 700. (``__main__`` turned the collector
    off for the imports.)"""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    gc.enable()


def main(argv: Sequence[str] | None = None) -> None:
    _tune_gc()
    try:
        cli.main(args=argv, prog_name="orchestrator", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except OrchestratorError as exc:
        click.echo(f"error: {Redactor().text(str(exc))}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
