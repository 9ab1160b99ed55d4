"""What a person sees: the live view while ``run`` works in a terminal, and tables."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from orchestrator.states import JobRecord, State
from orchestrator.statuses import UNKNOWN_STATUS_NOTICE, Phase, suggestion

if TYPE_CHECKING:
    from orchestrator.engine import Engine
    from orchestrator.store import Lease


def human_size(n: float) -> str:
    """Bytes as a person reads them: 512 B, 3.4 KiB, 1.2 GiB."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


SHOWN_IN_FLIGHT = 12
_PHASES = (State.VALIDATING, State.TRAINING)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def lease_text(lease: Lease | None) -> str | None:
    """Who drives a job of a shared store: ``host:pid:tag (2m05s)``, or that its worker
    went quiet and the job waits for another to take it over."""
    if lease is None:
        return None
    if lease.expires_in < 0:
        return f"{lease.worker} (expired {_duration(-lease.expires_in)} ago)"
    return f"{lease.worker} ({_duration(lease.age)})"


def unknown_status_note(record: JobRecord, now: float | None = None) -> str | None:
    """For a job whose gateway status has stayed unknown for minutes: what it is, and
    the manifest line that would map it."""
    since = record.unknown_status_since
    if since is None or record.remote_status is None:
        return None
    age = (now or time.time()) - since
    if age < UNKNOWN_STATUS_NOTICE:
        return None
    waiting = Phase.VALIDATING if record.state is State.VALIDATING else Phase.TRAINING
    return (
        f"{record.name}: status {record.remote_status!r} unknown for {age / 60:.0f} min; "
        f"add to the manifest: {suggestion(record.remote_status, waiting)}"
    )


def live_renderable(engine: Engine) -> Any:
    """Jobs by state, uploads in flight (bytes, rate, time left), unknown statuses and
    the last failures with their reasons."""
    counts = Counter(run.record.state for run in engine.runs.values())
    states = Table.grid(padding=(0, 2))
    states.add_row(*[Text(s.value, style="bold") for s in State if counts.get(s)])
    states.add_row(*[str(counts[s]) for s in State if counts.get(s)])
    jobs = len(engine.runs)
    parts: list[Any] = [Text(f"{jobs} job{'' if jobs == 1 else 's'}", style="bold"), states]
    uploads = list(engine.lc.metrics.uploads.items())
    if uploads:
        table = Table("upload", "sent", "rate", "left", box=None, padding=(0, 2))
        for name, p in uploads[:20]:
            eta = f"{p.eta:.0f}s" if p.eta is not None else "-"
            table.add_row(
                name,
                f"{human_size(p.sent)} / {human_size(p.total)}",
                f"{human_size(p.rate)}/s",
                eta,
            )
        parts.append(table)
    now = time.time()
    waiting = sorted(
        (run for run in engine.runs.values() if run.record.state in _PHASES),
        key=lambda run: run.record.phase_started_at or now,
    )
    if waiting:
        headers = ["in flight", "phase", "for", "expected end"]
        events = any(run.record.last_event for run in waiting)  # fine_tuning jobs say more
        table = Table(*headers, *(["last event"] if events else []), box=None, padding=(0, 2))
        for run in waiting[:SHOWN_IN_FLIGHT]:
            record = run.record
            end = engine.lc.clock.expected_end(run) if not record.phase_adopted else None
            row = [
                record.name,
                record.state.value,
                _duration(now - (record.phase_started_at or now)),
                f"in {_duration(end - now)}" if end and end > now else "-",
            ]
            table.add_row(*row, *([record.last_event or "-"] if events else []))
        if len(waiting) > SHOWN_IN_FLIGHT:
            more = f"... and {len(waiting) - SHOWN_IN_FLIGHT} more"
            table.add_row(more, *[""] * (len(table.columns) - 1))
        parts.append(table)
    notes = [note for run in engine.runs.values() if (note := unknown_status_note(run.record, now))]
    for note in notes[:5]:
        parts.append(Text(engine.lc.redact(note), style="yellow"))
    for name, reason in engine.lc.metrics.recent_failures:
        parts.append(Text(engine.lc.redact(f"failed {name}: {reason}"), style="red"))
    if engine.stopping:
        parts.append(Text("stopping: finishing calls in flight...", style="yellow"))
    return Group(*parts)


def text_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain aligned table: greppable, and the same in a terminal or a pipe."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )
