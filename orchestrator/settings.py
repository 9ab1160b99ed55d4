"""Tunable settings, with the defaults an operator gets when they set nothing."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.retry import RetryPolicy
from orchestrator.statuses import UNKNOWN_STATUS_NOTICE


@dataclass(frozen=True)
class ClientSettings:
    """How the gateway client talks HTTP."""

    connect_timeout: float = 10.0
    read_timeout: float = 60.0  # between bytes of an answer
    max_connections: int = 64  # requests wait for a slot of the client's, never in a pool
    requests_per_second: float | None = None  # None: no cap
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True)
class UploadSettings:
    """How datasets are streamed to the signed URL."""

    concurrency: int = 4  # large files at once
    # Smaller files have their own, wider limit: a batch of many small datasets must not
    # queue behind four slots, and they cost little bandwidth or memory.
    small_file_bytes: int = 16 * 1024 * 1024
    small_concurrency: int = 32
    block_size: int = 4 * 1024 * 1024
    deadline: float = 6 * 3600.0  # whole-upload bound
    stall_timeout: float = 120.0  # no block sent for this long: the PUT is restarted
    retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(initial=1.0, maximum=30.0, max_attempts=5)
    )
    max_fresh_urls: int = 3  # expired signed URLs tolerated before the job fails


@dataclass(frozen=True)
class PollSettings:
    """How validation and training are followed."""

    initial: float = 2.0
    coefficient: float = 1.5
    maximum: float = 60.0
    validation_deadline: float = 6 * 3600.0
    training_deadline: float = 7 * 24 * 3600.0
    # A status mapped to no phase is shown with the line that would map it once it has
    # stayed unknown this long.
    unknown_status_notice: float = UNKNOWN_STATUS_NOTICE

    def policy(self) -> RetryPolicy:
        # Polls use half-jitter-free backoff: full jitter would poll early on average,
        # costing GETs without finding news sooner.
        return RetryPolicy(
            initial=self.initial,
            coefficient=self.coefficient,
            maximum=self.maximum,
            max_attempts=1_000_000,
            jitter=False,
        )


@dataclass(frozen=True)
class CheckSettings:
    """Local dataset checks run before anything leaves the machine."""

    min_examples: int = 10
    long_example_chars: int = 64_000


@dataclass(frozen=True)
class EngineSettings:
    # Jobs taking a gateway step (a create, an attach, a poll...) at once. Bounding the
    # steps, not just the HTTP connections, keeps jobs moving through the pipeline in
    # order: 10,000 resumed jobs do not all persist an intent before the first one acts.
    step_concurrency: int = 64
    # How long one step may keep failing transiently (the gateway down, answers we
    # cannot read) before the job fails; a retry of it then adopts what was made.
    step_deadline: float = 6 * 3600.0
    cancel_check_interval: float = 1.0
    shutdown_grace: float = 10.0
    notify_milestones: bool = False  # besides the end: when validating and training begin
    notify_grace: float = 10.0  # how long a batch waits at its end to deliver notifications
    client: ClientSettings = field(default_factory=ClientSettings)
    upload: UploadSettings = field(default_factory=UploadSettings)
    poll: PollSettings = field(default_factory=PollSettings)
    check: CheckSettings = field(default_factory=CheckSettings)
