"""Counters for ``/metrics`` (Prometheus text) and the live view's upload progress.

Each ``Metrics`` owns its own registry: nothing global, so tests and several engines
in one process never share counts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client import Counter as PromCounter

from orchestrator.states import State


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


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Gauge("orchestrator_jobs", "Jobs by state", ["state"], registry=r)
        self.transitions = PromCounter(
            "orchestrator_transitions", "State transitions", ["old", "new"], registry=r
        )
        self.calls = PromCounter(
            "orchestrator_gateway_calls",
            "Gateway HTTP attempts",
            ["endpoint", "status_class"],
            registry=r,
        )
        self.retries = PromCounter(
            "orchestrator_gateway_retries", "Gateway retries", ["endpoint"], registry=r
        )
        self.polls = PromCounter("orchestrator_polls", "Status polls of finetunes", registry=r)
        self.upload_bytes = PromCounter(
            "orchestrator_upload_bytes", "Bytes uploaded to signed URLs", registry=r
        )
        self.upload_seconds = PromCounter(
            "orchestrator_upload_seconds", "Seconds spent uploading", registry=r
        )
        self.uploads_total = PromCounter("orchestrator_uploads", "Completed uploads", registry=r)
        self.manifest_errors = Gauge(
            "orchestrator_manifest_errors", "Manifests that failed to load", registry=r
        )
        self.uploads: dict[str, UploadProgress] = {}
        self._children: dict[tuple[object, ...], Any] = {}

    def _labelled(self, metric: PromCounter, *values: str) -> Any:
        # labels() validates and locks on every call; a batch makes ~20 per job, over a
        # few dozen distinct label sets.
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    # -- gateway client observer
    def gateway_call(self, endpoint: str, status: int | None, seconds: float) -> None:
        status_class = f"{status // 100}xx" if status else "transport_error"
        self._labelled(self.calls, endpoint, status_class).inc()

    def gateway_retry(self, endpoint: str) -> None:
        self._labelled(self.retries, endpoint).inc()

    # -- lifecycle
    def transition(self, old: str, new: str) -> None:
        self._labelled(self.transitions, old, new).inc()

    def polled(self) -> None:
        self.polls.inc()

    def uploaded(self, size: int, seconds: float) -> None:
        self.upload_bytes.inc(size)
        self.upload_seconds.inc(seconds)
        self.uploads_total.inc()

    def upload_progress(self, name: str, total: int) -> Callable[[int], None]:
        progress = self.uploads[name] = UploadProgress(total=total, started=time.monotonic())

        def advance(n: int) -> None:
            progress.sent = max(0, progress.sent + n)

        return advance

    def upload_finished(self, name: str) -> None:
        self.uploads.pop(name, None)

    def set_job_counts(self, counts: Mapping[str, int]) -> None:
        for state in State:
            self.jobs.labels(state.value).set(counts.get(state.value, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
