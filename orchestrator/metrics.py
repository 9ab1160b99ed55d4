"""Counters and gauges for ``/metrics`` (Prometheus text), and the live view's upload
progress.

Each ``Metrics`` keeps its own numbers: nothing global, so tests and several engines in
one process never share counts. They become Prometheus families only when ``render``
is called; prometheus_client is imported then, not when a batch run starts.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.states import State

if TYPE_CHECKING:
    from prometheus_client.core import Metric


@dataclass
class UploadProgress:
    total: int
    sent: int = 0
    started: float = 0.0

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.sent / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        rate = self.rate
        return (self.total - self.sent) / rate if rate > 0 else None


@dataclass(frozen=True)
class _CounterSpec:
    name: str
    help: str
    labels: tuple[str, ...] = ()


_TRANSITIONS = _CounterSpec("orchestrator_transitions", "State transitions", ("old", "new"))
_CALLS = _CounterSpec(
    "orchestrator_gateway_calls", "Gateway HTTP attempts", ("endpoint", "status_class")
)
_RETRIES = _CounterSpec("orchestrator_gateway_retries", "Gateway retries", ("endpoint",))
_POLLS = _CounterSpec("orchestrator_polls", "Status polls of finetunes")
_UNOBSERVED = _CounterSpec(
    "orchestrator_unreadable_polls", "Polls whose answer could not be read (observed again)"
)
_UPLOAD_BYTES = _CounterSpec("orchestrator_upload_bytes", "Bytes uploaded to signed URLs")
_UPLOAD_SECONDS = _CounterSpec("orchestrator_upload_seconds", "Seconds spent uploading")
_UPLOADS = _CounterSpec("orchestrator_uploads", "Completed uploads")
_COUNTERS = (
    _TRANSITIONS,
    _CALLS,
    _RETRIES,
    _POLLS,
    _UNOBSERVED,
    _UPLOAD_BYTES,
    _UPLOAD_SECONDS,
    _UPLOADS,
)


class _Counts:
    """Counters kept as plain numbers and turned into Prometheus families only when
    scraped. prometheus_client's ``Counter.inc`` takes a lock and checks its labels on
    every call, and a batch counts a score of events per job on the event loop's thread;
    a run that is never scraped never imports prometheus_client at all."""

    def __init__(self) -> None:
        self.values: dict[_CounterSpec, dict[tuple[str, ...], float]] = {
            spec: {} if spec.labels else {(): 0.0} for spec in _COUNTERS
        }

    def add(self, spec: _CounterSpec, *labels: str, amount: float = 1.0) -> None:
        series = self.values[spec]
        series[labels] = series.get(labels, 0.0) + amount

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        for spec, series in self.values.items():
            family = CounterMetricFamily(spec.name, spec.help, labels=spec.labels)
            for labels, value in series.items():
                family.add_metric(labels, value)
            yield family


class Metrics:
    def __init__(self) -> None:
        self.counts = _Counts()
        self.job_counts: dict[str, int] = {}  # by state, as of the last scrape
        self.manifest_errors = 0  # manifests that failed to load
        self.uploads: dict[str, UploadProgress] = {}
        self.recent_failures: deque[tuple[str, str]] = deque(maxlen=5)  # (job, reason)

    # -- gateway client observer
    def gateway_call(self, endpoint: str, status: int | None, seconds: float) -> None:
        status_class = f"{status // 100}xx" if status else "transport_error"
        self.counts.add(_CALLS, endpoint, status_class)

    def gateway_retry(self, endpoint: str) -> None:
        self.counts.add(_RETRIES, endpoint)

    # -- lifecycle
    def transition(self, old: str, new: str) -> None:
        self.counts.add(_TRANSITIONS, old, new)

    def polled(self) -> None:
        self.counts.add(_POLLS)

    def unobserved(self) -> None:
        self.counts.add(_UNOBSERVED)

    def failed(self, name: str, reason: str) -> None:
        self.recent_failures.append((name, reason))

    def uploaded(self, size: int, seconds: float) -> None:
        self.counts.add(_UPLOAD_BYTES, amount=size)
        self.counts.add(_UPLOAD_SECONDS, amount=seconds)
        self.counts.add(_UPLOADS)

    def upload_progress(self, name: str, total: int) -> Callable[[int], None]:
        progress = self.uploads[name] = UploadProgress(total=total, started=time.monotonic())

        def advance(n: int) -> None:
            progress.sent = max(0, progress.sent + n)

        return advance

    def upload_finished(self, name: str) -> None:
        self.uploads.pop(name, None)

    def set_job_counts(self, counts: Mapping[str, int]) -> None:
        self.job_counts = {state.value: counts.get(state.value, 0) for state in State}

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        jobs = GaugeMetricFamily("orchestrator_jobs", "Jobs by state", labels=["state"])
        for state, count in self.job_counts.items():
            jobs.add_metric([state], count)
        yield jobs
        yield GaugeMetricFamily(
            "orchestrator_manifest_errors",
            "Manifests that failed to load",
            value=self.manifest_errors,
        )
        yield from self.counts.collect()

    def render(self) -> bytes:
        """The Prometheus text exposition of every family."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=True)
        registry.register(self)
        return generate_latest(registry)
