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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import fields, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import click

from orchestrator.errors import InputError, OrchestratorError
from orchestrator.logs import Redactor, configure_logging
from orchestrator.metrics import Metrics
from orchestrator.settings import (
    CheckSettings,
    EngineSettings,
    PollSettings,
    UploadSettings,
)
from orchestrator.states import JobRecord, Transition, iso_time
from orchestrator.store import (
    DEFAULT_LEASE_TTL,
    Lease,
    OwnerLock,
    StateLocation,
    open_store,
)

if TYPE_CHECKING:
    from orchestrator.manifest import Manifest
    from orchestrator.plan import PlannedJob
    from orchestrator.runner import BatchResult, Notifications

DEFAULT_STATE = Path(".orchestrator") / "state.db"
T = TypeVar("T")


def _password_file(ctx: click.Context, _: click.Parameter, value: Path | None) -> None:
    ctx.meta["state_password_file"] = value


def _state_location(ctx: click.Context, _: click.Parameter, value: str) -> StateLocation:
    return StateLocation(value, ctx.meta.get("state_password_file"))


def state_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option(
        "--state",
        "state",
        default=str(DEFAULT_STATE),
        envvar="ORCHESTRATOR_STATE",
        show_default=True,
        callback=_state_location,
        help="SQLite state file, or a postgresql:// URL shared by several workers "
        "(or ORCHESTRATOR_STATE).",
    )(fn)
    return click.option(
        "--state-password-file",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="ORCHESTRATOR_STATE_PASSWORD_FILE",
        is_eager=True,  # read before --state, which it completes
        expose_value=False,
        callback=_password_file,
        help="The database password, if not in the URL, PGPASSWORD or ~/.pgpass.",
    )(fn)


lease_ttl_option = click.option(
    "--lease-ttl",
    type=click.FloatRange(1.0),
    default=DEFAULT_LEASE_TTL,
    envvar="ORCHESTRATOR_LEASE_TTL",
    show_default=True,
    help="With a postgresql:// state: seconds a worker that went quiet keeps its jobs "
    "before others take them over.",
)
min_examples_option = click.option(
    "--min-examples",
    type=click.IntRange(1),
    default=10,
    show_default=True,
    help="Fewest examples a dataset may have.",
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
        min_examples_option,
        click.option(
            "--requests-per-second",
            type=click.FloatRange(0.1),
            default=None,
            help="Cap on gateway requests per second (default: no cap).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _notify_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option(
                "--notify",
                "notify_urls",
                multiple=True,
                metavar="URL",
                callback=_check_urls,
                help="POST a signed JSON event here when a job ends (repeatable; adds to "
                "the manifests' notify:).",
            ),
            click.option(
                "--notify-secret-file",
                type=click.Path(dir_okay=False, path_type=Path),
                help="The HMAC-SHA256 secret that signs events (or ORCHESTRATOR_NOTIFY_SECRET).",
            ),
            click.option(
                "--notify-milestones",
                is_flag=True,
                help="Also notify when validation and training begin.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _check_urls(ctx: click.Context, param: click.Parameter, urls: tuple[str, ...]) -> Any:
    from orchestrator.manifest import http_url

    try:
        return tuple(http_url(url) for url in urls)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _notifications(urls: tuple[str, ...], secret_file: Path | None) -> Notifications:
    """The CLI's notification URLs and the secret, from a file or the environment."""
    from orchestrator.runner import Notifications

    secret = os.environ.get("ORCHESTRATOR_NOTIFY_SECRET", "").encode() or None
    if secret_file is not None:
        try:
            secret = secret_file.read_bytes().strip() or None
        except OSError as exc:
            raise InputError(f"--notify-secret-file {secret_file}: {exc.strerror}") from None
        if secret is None:
            raise InputError(f"--notify-secret-file {secret_file}: the file is empty")
    _redactor().add_secret(secret.decode(errors="replace") if secret else None)
    return Notifications(urls, secret)


def _settings(
    upload_concurrency: int,
    api_concurrency: int,
    poll_interval: float,
    poll_max: float,
    min_examples: int,
    requests_per_second: float | None = None,
) -> EngineSettings:
    base = EngineSettings()
    return replace(
        base,
        client=replace(
            base.client,
            max_connections=api_concurrency,
            requests_per_second=requests_per_second,
        ),
        step_concurrency=api_concurrency,
        upload=replace(UploadSettings(), concurrency=upload_concurrency),
        poll=replace(PollSettings(), initial=poll_interval, maximum=max(poll_max, poll_interval)),
        check=replace(CheckSettings(), min_examples=min_examples),
    )


def _run_async(fn: Callable[[], Awaitable[T]]) -> T:
    # uvloop where it is installed (not on Windows); docs/performance.md says why.
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
@lease_ttl_option
@verbose_option
@_notify_options
@_settings_options
def run(
    manifest_path: Path,
    state: StateLocation,
    lease_ttl: float,
    until: str,
    retry_failed: bool,
    replace_names: tuple[str, ...],
    live: bool | None,
    verbose: bool,
    notify_urls: tuple[str, ...],
    notify_secret_file: Path | None,
    notify_milestones: bool,
    **settings_kw: Any,
) -> None:
    """Advance every job of MANIFEST; a rerun resumes where the last one stopped."""
    settings = replace(_settings(**settings_kw), notify_milestones=notify_milestones)
    show_live = sys.stderr.isatty() if live is None else live
    redactor = _redactor()
    _logging(redactor, quiet=show_live, verbose=verbose)
    notify = _notifications(notify_urls, notify_secret_file)
    sys.exit(
        _run_and_report(
            manifest_path,
            state,
            until,
            retry_failed,
            replace_names,
            settings,
            show_live,
            notify,
            lease_ttl,
        )
    )


def _run_and_report(
    manifest_path: Path,
    state: StateLocation,
    until: str,
    retry_failed: bool,
    replace_names: Sequence[str],
    settings: EngineSettings,
    live: bool,
    notify: Notifications | None = None,
    lease_ttl: float = DEFAULT_LEASE_TTL,
) -> int:
    """``run_manifest``, its summary printed; the exit code."""
    from orchestrator.runner import run_manifest

    redactor = _redactor()
    result = _run_async(
        lambda: run_manifest(
            manifest_path,
            state,
            until=until,
            retry_failed=retry_failed,
            replace=replace_names,
            settings=settings,
            redactor=redactor,
            live=live,
            notify=notify,
            lease_ttl=lease_ttl,
        )
    )
    _print_summary(result, redactor)
    summary = result.summary
    if summary.fatal:
        raise InputError(summary.fatal)
    if summary.broken:
        click.echo(f"error: {redactor.text(summary.broken)}", err=True)
    return summary.exit_code(until)


async def _load_records(state: StateLocation, names: Sequence[str]) -> dict[str, JobRecord]:
    """The stored records of ``names``; an absent state file is not created here."""
    if not await anyio.to_thread.run_sync(state.exists):
        return {}
    async with open_store(state) as store:
        return await store.load(names)


SHOWN_FAILURES = 5  # failed jobs listed with their reasons under run's summary


def _print_summary(result: BatchResult, redactor: Redactor) -> None:

    summary = result.summary
    counts = summary.counts()
    line = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    click.echo(f"{_plural(len(summary.states), 'job')}: {line or 'none'}")
    for plan in result.planned:
        if plan.left_alone:
            click.echo(f"  {plan.spec.name}: {plan.describe()}")
    failed = sorted(summary.errors.items())
    for name, error in failed[:SHOWN_FAILURES]:
        click.echo(f"  {name} failed: {redactor.text(error)}")
    if len(failed) > SHOWN_FAILURES:
        click.echo(f"  ... and {len(failed) - SHOWN_FAILURES} more failed (see `status`)")
    if summary.interrupted:
        click.echo("interrupted: run the same command again to resume", err=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ----------------------------------------------------------------------- plan


@cli.command()
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(path_type=Path))
@state_option
@click.option("--retry-failed", is_flag=True, help="Plan failed jobs as retried, as `run` would.")
@click.option(
    "--replace",
    "replace_names",
    multiple=True,
    metavar="NAME",
    help="Plan NAME as replaced although its spec changed (repeatable).",
)
@min_examples_option
def plan(
    manifest_path: Path,
    state: StateLocation,
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
        records = await _load_records(state, [j.name for j in manifest.jobs])
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
@min_examples_option
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
    problems = 0
    for r in reports.values():
        for warning in r.warnings:
            click.echo(f"warning: {warning}", err=True)
        for error in r.errors:
            click.echo(f"error: {error}", err=True)
        if r.more_errors:
            click.echo(
                f"error: ... and {_plural(r.more_errors, 'more problem')} in {r.path}", err=True
            )
        problems += len(r.errors) + r.more_errors
    if problems:
        sys.exit(2)
    from orchestrator.view import human_size

    rate = total / elapsed if elapsed > 0 else 0.0
    click.echo(
        f"ok: {_plural(len(manifest.jobs), 'job')}, {_plural(len(reports), 'dataset')}, "
        f"{human_size(total)} checked at {human_size(rate)}/s"
    )


# --------------------------------------------------------------------- status


def _selection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.argument("patterns", nargs=-1, metavar="[NAME|GLOB]..."),
            click.option(
                "--where",
                multiple=True,
                metavar="KEY=VALUE",
                help="Only jobs whose KEY (state, provider, model, remote_status, manifest) "
                "is VALUE; repeatable.",
            ),
            click.option(
                "--manifest",
                "manifest_filter",
                type=click.Path(path_type=Path),
                help="Only jobs recorded from this manifest.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


def _selected(
    state: StateLocation, patterns: Sequence[str], where: Sequence[str], manifest: Path | None
) -> list[JobRecord]:
    """The jobs of the state file that the command's selection names."""
    from orchestrator.selection import Selection

    selection = Selection.parse(patterns, where, manifest)
    if not state.exists():
        raise InputError(f"{state}: no state file (run a manifest first, or pass --state)")

    async def load() -> dict[str, JobRecord]:
        async with open_store(state) as store:
            return await store.load()

    return selection.pick(_run_async(load).values(), state)


@cli.command()
@state_option
@click.option("--json", "as_json", is_flag=True, help="A JSON array instead of a table.")
@click.option("--history", is_flag=True, help="Every transition of the shown jobs.")
@click.option(
    "--watch",
    is_flag=True,
    help="Refresh the table in place until every shown job has ended.",
)
@_selection_options
def status(
    state: StateLocation,
    as_json: bool,
    history: bool,
    watch: bool,
    patterns: tuple[str, ...],
    where: tuple[str, ...],
    manifest_filter: Path | None,
) -> None:
    """Show jobs from the state file (works beside a running engine)."""
    records = _selected(state, patterns, where, manifest_filter)
    redact = _redactor().text
    if as_json:
        leases = _run_async(lambda: _undelivered_and_leases(state))[1] if state.is_database else {}
        shown = [
            {**r.public(), **(lease.public() if (lease := leases.get(r.name)) else {})}
            for r in records
        ]
        _emit(redact(json.dumps(shown, indent=2)))
        return
    if watch:
        _watch_status(state, patterns, where, manifest_filter)
        return
    waiting, leases = _run_async(lambda: _undelivered_and_leases(state))
    out = [_status_text(records, leases)]
    if waiting:
        urls = sorted({event.url for event in waiting})
        out.append(
            f"\n{_plural(len(waiting), 'notification')} not delivered yet, to "
            + ", ".join(urls)
            + " (a run or daemon with the secret delivers them)"
        )
    if history:
        histories = _run_async(lambda: _histories(state, [r.name for r in records]))
        for name, transitions in histories.items():
            out.append(f"\n{name}:")
            for t in transitions:
                line = f"  {iso_time(t.at)}  {t.old.value if t.old else '-'} -> {t.new.value}"
                out.append(line + (f"  ({t.detail})" if t.detail else ""))
    _emit(redact("\n".join(out)))


def _emit(text: str) -> None:
    """Print a large output whole. Written with ``os.write`` until every byte is out:
    after the database's event loop has run, a write to a pipe a reader has not emptied
    came back short and the rest was lost (seen with ``status --json`` of 300 jobs)."""
    sys.stdout.flush()
    data = (text + "\n").encode()
    while data:
        data = data[os.write(sys.stdout.fileno(), data) :]


def _status_text(records: Sequence[JobRecord], leases: Mapping[str, Lease] | None = None) -> str:
    from orchestrator.view import lease_text, text_table, unknown_status_note

    headers = ["job", "state", "remote status", "dataset", "finetune", "model / error"]
    abandoned = any(r.abandoned_datasets or r.abandoned_finetunes for r in records)
    if abandoned:  # left behind by expired URLs, restarts, retries and replaces
        headers.append("abandoned")
    if leases:  # a shared store: which worker drives each job
        headers.append("worker (lease)")
    rows = []
    for r in records:
        remote = f"{r.remote_status} (unknown)" if r.unknown_status_since else r.remote_status
        row = [r.name, r.state.value, remote, r.dataset_id, r.finetune_id]
        row.append(r.fine_tuned_model or r.error)
        if abandoned:
            row.append(", ".join((*r.abandoned_datasets, *r.abandoned_finetunes)) or None)
        if leases:
            row.append(lease_text(leases.get(r.name)))
        rows.append(row)
    text = text_table(headers, rows)
    notes = [note for r in records if (note := unknown_status_note(r))]
    if notes:
        text += "\n\nunknown gateway statuses (the job keeps polling until its deadline):"
        text += "".join(f"\n  {note}" for note in notes)
    return text


def _watch_status(
    state: StateLocation, patterns: Sequence[str], where: Sequence[str], manifest: Path | None
) -> None:
    """The status table, read again every second, until every shown job has ended."""
    import time

    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    redact = _redactor().text
    with Live(console=Console(), auto_refresh=False) as live:
        while True:
            records = _selected(state, patterns, where, manifest)
            live.update(Text(redact(_status_text(records))), refresh=True)
            if all(r.state.terminal for r in records):
                return
            time.sleep(1.0)


async def _undelivered_and_leases(state: StateLocation) -> tuple[list[Any], dict[str, Lease]]:
    async with open_store(state) as store:
        return await store.undelivered(), await store.leases()


async def _histories(state: StateLocation, names: Sequence[str]) -> dict[str, list[Transition]]:
    async with open_store(state) as store:
        return {name: await store.history(name) for name in names}


# -------------------------------------------------------------------- results


@cli.command()
@state_option
@click.option(
    "--format",
    "output",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="How to print the rows.",
)
@_selection_options
def results(
    state: StateLocation,
    output: str,
    patterns: tuple[str, ...],
    where: tuple[str, ...],
    manifest_filter: Path | None,
) -> None:
    """One row per finished job: the fine-tuned model to hand on, or why it failed."""
    import csv
    import io

    from orchestrator.view import text_table

    records = _selected(state, patterns, where, manifest_filter)
    rows = [r.result() for r in records if r.state.terminal]
    redact = _redactor().text
    if output == "json":
        _emit(redact(json.dumps(rows, indent=2)))
        return
    columns = list(rows[0]) if rows else list(JobRecord(name="", fingerprint="").result())
    if output == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
        _emit(redact(buffer.getvalue()).removesuffix("\n"))
        return
    shown = ["name", "state", "provider", "base_model", "fine_tuned_model", "finished_at"]
    table = [[row[c] for c in shown] + [row["reason"] or _size_of(row)] for row in rows]
    _emit(redact(text_table([*shown, "reason / size"], table)))


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a gateway's words starting with = + - @
    are not run as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _size_of(row: dict[str, Any]) -> str | None:
    parts = [f"{row[k]} {k}" for k in ("records", "tokens", "units") if row[k] is not None]
    return ", ".join(parts) or None


# --------------------------------------------------------------------- forget


@cli.command()
@state_option
def migrate(state: StateLocation) -> None:
    """Bring the state's schema up to date, and say from which version. Every run and
    daemon does this as it starts (the first of several workers; the others wait); this
    does only that, before the workers of a new release start."""

    async def go() -> tuple[int, int]:
        async with open_store(state) as store:
            return store.schema

    found, now = _run_async(go)
    if found == now:
        click.echo(f"{state}: schema version {now}, up to date")
    else:
        click.echo(f"{state}: schema version {found or 'none'} -> {now}")


@cli.command()
@state_option
@click.option(
    "--finished-before",
    type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    help="Every job that ended before this date (UTC), besides any named.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Also jobs their manifest still names (a later run would submit them again).",
)
@click.argument("names", nargs=-1, metavar="[NAME|GLOB]...")
def forget(state: StateLocation, finished_before: Any, force: bool, names: tuple[str, ...]) -> None:
    """Remove finished jobs and their history from the state file. Jobs in flight are
    refused (cancel them first), and so are jobs their manifest still names, unless
    --force: a run of that manifest would submit them again."""
    from calendar import timegm

    if not names and finished_before is None:
        raise click.UsageError("name the jobs to forget, or pass --finished-before DATE")
    records = _selected(state, (), (), None)
    chosen = {r.name: r for r in _selected(state, names, (), None)} if names else {}
    if finished_before is not None:
        cutoff = timegm(finished_before.timetuple())
        chosen.update({r.name: r for r in records if r.state.terminal and r.updated_at < cutoff})
    in_flight = sorted(n for n, r in chosen.items() if not r.state.terminal)
    if in_flight:
        raise InputError(f"still in flight, not forgotten: {', '.join(in_flight)}")
    if not force:
        names_in: dict[str, set[str] | None] = {}
        named = sorted(n for n, r in chosen.items() if _still_named(r, names_in))
        if named:
            raise InputError(
                f"still named by their manifest, not forgotten: {', '.join(named)} "
                "(a later run would submit them again; remove them from it, or --force)"
            )

    async def go() -> list[str]:
        async with open_store(state) as store:
            return await store.forget(sorted(chosen))

    gone = _run_async(go)
    click.echo(f"forgot {_plural(len(gone), 'job')}" + (f": {', '.join(gone)}" if gone else ""))


def _still_named(record: JobRecord, names_in: dict[str, set[str] | None]) -> bool:
    """The manifest the job was recorded from is there and still names it. Its names
    are read from the YAML as written (no ${VARS} needed), once per file; a file that
    cannot be read that far counts as naming it: forgetting is not undone."""
    import yaml

    path = record.manifest
    if not path or not Path(path).is_file():
        return False
    if path not in names_in:
        try:
            jobs = yaml.safe_load(Path(path).read_text(encoding="utf-8"))["jobs"]
            names_in[path] = {str(job["name"]) for job in jobs}
        except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
            names_in[path] = None
    names = names_in[path]
    return names is None or record.name in names


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
    state: StateLocation,
    manifest_path: Path | None,
    wait: float,
) -> None:
    """Cancel jobs on the gateway and in the state file, with or without a running engine.

    The API key comes from --manifest, else PORTKEY_API_KEY, else the manifest each job
    was recorded from; it is never stored."""
    from orchestrator.runner import cancel_jobs

    if bool(names) == cancel_all:
        raise click.UsageError("name the jobs to cancel, or pass --all")
    if not state.exists():
        raise InputError(f"{state}: no state file")
    redactor = _redactor()
    _logging(redactor, quiet=True)
    outcomes = _run_async(
        lambda: cancel_jobs(
            state,
            names,
            cancel_all=cancel_all,
            manifest_path=manifest_path,
            settings=EngineSettings(),
            redactor=redactor,
            wait=wait,
        )
    )
    if not outcomes:
        click.echo("nothing to cancel: every job has ended")
    for outcome in outcomes:
        click.echo(redactor.text(f"{outcome.name}: {outcome.message}"))


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
    help="HOST:PORT for the status page, /healthz, /metrics and /jobs (port 0 picks one).",
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
@click.option(
    "--auth-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A bearer token the page and the JSON require (needed to listen off loopback).",
)
@lease_ttl_option
@verbose_option
@_notify_options
@_settings_options
def daemon(
    watch_dir: Path,
    state: StateLocation,
    listen: str,
    rescan: float,
    force_polling: bool,
    shutdown_grace: float,
    auth_token_file: Path | None,
    lease_ttl: float,
    verbose: bool,
    notify_urls: tuple[str, ...],
    notify_secret_file: Path | None,
    notify_milestones: bool,
    **settings_kw: Any,
) -> None:
    """Watch a folder of manifests and drive their jobs until SIGTERM. Serves a status
    page at / besides /healthz, /metrics and /jobs."""
    from orchestrator.daemon import Daemon, is_loopback, parse_listen

    address = parse_listen(listen)
    token = None
    if auth_token_file is not None:
        try:
            token = auth_token_file.read_text().strip() or None
        except OSError as exc:
            raise InputError(f"--auth-token-file {auth_token_file}: {exc.strerror}") from None
        if token is None:
            raise InputError(f"--auth-token-file {auth_token_file}: the file is empty")
    elif not is_loopback(address[0]):
        raise InputError(
            f"--listen {listen}: not a loopback address; the page and the JSON would be open "
            "to the network: pass --auth-token-file FILE"
        )
    if not watch_dir.is_dir():
        raise InputError(f"--watch {watch_dir}: not a folder")
    settings = replace(
        _settings(**settings_kw),
        shutdown_grace=shutdown_grace,
        notify_milestones=notify_milestones,
    )
    redactor = _redactor()
    _logging(redactor, verbose=verbose)
    redactor.add_secret(token)
    notify = _notifications(notify_urls, notify_secret_file)
    # Every manifest's key is registered as it loads; the environment's one now.
    redactor.add_secret(os.environ.get("PORTKEY_API_KEY"))
    redactor.add_secret(state.password())

    async def serve() -> int:
        owner = None if state.is_database else OwnerLock(state.path)
        try:
            if owner is not None:
                owner.acquire()  # one daemon or run per SQLite file
            async with open_store(state, owner=owner, lease_ttl=lease_ttl) as store:
                service = Daemon(
                    watch_dir,
                    store,
                    settings,
                    Metrics(),
                    listen=address,
                    rescan_interval=rescan,
                    force_polling=force_polling,
                    redactor=redactor,
                    notify=notify,
                    auth_token=token,
                )
                await service.run()
                return service.exit_code
        finally:
            if owner is not None:
                owner.release()

    sys.exit(_run_async(serve))


# ------------------------------------------------------------------------ sim


def _sim_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    # The config module alone: the simulator's server (aiohttp.web) loads only for `sim`.
    from orchestrator.simulator.config import HELP, SimConfig

    for f in reversed(fields(SimConfig)):
        default = getattr(SimConfig(), f.name)
        flag = isinstance(default, bool)
        fn = click.option(
            f"--{f.name.replace('_', '-')}",
            f.name,
            type=None if flag else type(default),
            is_flag=flag,
            default=default,
            show_default=f.name != "api_key" and not flag,
            help=HELP[f.name],
        )(fn)
    return fn


def _preload(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[Any]:
    pairs = []
    for value in values:
        key, sep, file = value.partition("=")
        path = Path(file)
        if not sep or not key or not path.is_file():
            raise click.BadParameter(f"{value}: expected KEY=FILE with an existing file")
        pairs.append((key, path))
    return pairs


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="0: any free port.",
)
@click.option(
    "--preload",
    multiple=True,
    metavar="KEY=FILE",
    callback=_preload,
    help="Put FILE in the bucket under KEY, as if uploaded before (for s3_key jobs); repeatable.",
)
@click.option("--access-log", is_flag=True, help="Print one line per request served.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where uploaded objects are kept (default: a temporary folder).",
)
@_sim_options
def sim(
    host: str,
    port: int,
    data_dir: Path | None,
    preload: list[tuple[str, Path]],
    access_log: bool,
    **config: Any,
) -> None:
    """Run the gateway simulator. The first line printed says where it listens."""
    import asyncio

    from orchestrator.simulator import SimConfig
    from orchestrator.simulator.server import serve_forever

    try:
        asyncio.run(serve_forever(SimConfig(**config), host, port, data_dir, preload, access_log))
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port is taken, the address is not this machine's
        reason = exc.strerror or str(exc)
        raise InputError(f"cannot listen on {host}:{port}: {reason.lower()}") from None


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
        state = StateLocation(str(Path(tmp) / "state.db"))
        click.echo(f"simulator on {simulator.url}; running {manifest_path}\n")
        settings = _settings(4, 64, 0.5, 2.0, 10)
        redactor = _redactor()
        redactor.add_secret(config.api_key)
        live = sys.stderr.isatty()
        _logging(redactor, quiet=live)
        code = _run_and_report(manifest_path, state, "done", False, (), settings, live)
        click.echo("")
        click.echo(_redactor().text(_status_text(_selected(state, (), (), None))))
        click.echo(
            "\n(two jobs fail on purpose: one dataset fails the local checks, one is "
            "rejected by the simulated provider)"
        )
    sys.exit(0 if code in (0, 1) else code)


# ----------------------------------------------------------------------- main


def _tune_gc() -> None:
    """Fewer cyclic collections: a big manifest or state file is hundreds of thousands
    of short-lived objects that form no cycles. What is imported by now is frozen out of
    the collector's reach; cycles are still collected, every 50,000 allocations instead
    of every 700 (docs/performance.md has what that bought)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _redactor() -> Redactor:
    """The process's one redactor, made by ``main`` (a fresh one outside it)."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return obj if isinstance(obj, Redactor) else Redactor()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Every way out is one line and an exit code: 2 for bad input (nothing was done),
    1 for a failure mid-run, 130 for an interrupt. Never a traceback for any of them."""
    _tune_gc()
    redactor = Redactor()
    try:
        try:
            cli.main(args=argv, prog_name="orchestrator", standalone_mode=False, obj=redactor)
        except BaseExceptionGroup as group:  # from task groups: report its first cause
            leaves = _leaves(group)
            known = [e for e in leaves if isinstance(e, OrchestratorError | OSError)]
            if known:
                raise known[0] from None
            if all(
                isinstance(e, KeyboardInterrupt | anyio.get_cancelled_exc_class()) for e in leaves
            ):
                raise KeyboardInterrupt from None
            raise
    except (click.exceptions.Abort, KeyboardInterrupt):
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # on the way out: another is moot
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except OrchestratorError as exc:
        click.echo(f"error: {redactor.text(str(exc))}", err=True)
        sys.exit(2)
    except OSError as exc:  # a file or the disk failed where no step expected it
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error: {redactor.text(where + (exc.strerror or str(exc)))}", err=True)
        sys.exit(1)
