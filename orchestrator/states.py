"""A job's states, the table of allowed transitions per API dialect, and the record
the store keeps.

The gateway's finetune flow (``api: finetune``):

    pending -> dataset_created -> uploaded -> dataset_ready -> finetune_created
            -> dataset_attached -> validating -> validated -> training
            -> succeeded | failed | cancelled

The OpenAI-compatible flow (``api: fine_tuning``), where a job validates its file and
trains on its own once created:

    pending -> dataset_ready (the file uploaded) -> finetune_created (the job created)
            -> validating -> training -> succeeded | failed | cancelled

``s3_key`` jobs go from ``dataset_created`` straight to ``dataset_ready``; a job whose
dataset content was already uploaded goes from ``pending`` straight to ``dataset_ready``.
``failed`` and ``cancelled`` are reachable from every state that is not terminal.

Adoption: a finetune observed further along than the job's state (an idempotent replay
after a lost state file, a start that happened before a crash) is followed from where
the gateway says it is, so the observing states may jump ahead.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace
from typing import Any


class State(enum.StrEnum):
    PENDING = "pending"
    DATASET_CREATED = "dataset_created"
    UPLOADED = "uploaded"
    DATASET_READY = "dataset_ready"
    FINETUNE_CREATED = "finetune_created"
    DATASET_ATTACHED = "dataset_attached"
    VALIDATING = "validating"
    VALIDATED = "validated"
    TRAINING = "training"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def submitted(self) -> bool:
        """Training has been started (or the job has ended)."""
        return self is State.TRAINING or self.terminal


TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED})

_ADOPTED = frozenset({State.VALIDATING, State.VALIDATED, State.TRAINING, State.SUCCEEDED})

_FORWARD: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.DATASET_CREATED, State.DATASET_READY}),
    # A self-loop: the signed URL expired or was lost in a restart, so a fresh dataset.
    State.DATASET_CREATED: frozenset({State.DATASET_CREATED, State.UPLOADED, State.DATASET_READY}),
    State.UPLOADED: frozenset({State.DATASET_READY}),
    State.DATASET_READY: frozenset({State.FINETUNE_CREATED}),
    # Each state that observes the finetune may adopt what the gateway says (a finetune
    # found further along is never re-attached, which would reset it).
    State.FINETUNE_CREATED: frozenset({State.DATASET_ATTACHED}) | _ADOPTED,
    State.DATASET_ATTACHED: _ADOPTED,
    State.VALIDATING: _ADOPTED - {State.VALIDATING},
    # Validated -> training either way (sent, or a start observed to have happened); a
    # finetune the gateway shows validating again is followed there.
    State.VALIDATED: _ADOPTED - {State.VALIDATED},
    State.TRAINING: frozenset({State.SUCCEEDED}),
}

TRANSITIONS: dict[State, frozenset[State]] = {
    state: (_FORWARD.get(state, frozenset()) | {State.FAILED, State.CANCELLED})
    if not state.terminal
    # A terminal job moves again only when the user asks (--retry-failed, --replace, an
    # edited spec): a new attempt starts, or fails at once when its dataset is invalid.
    else frozenset({State.PENDING, State.FAILED})
    for state in State
}


_FINE_TUNING_OBSERVED = frozenset({State.VALIDATING, State.TRAINING, State.SUCCEEDED})
_FINE_TUNING_FORWARD: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.DATASET_READY}),
    # A job found by its tags after a lost answer may be anywhere along already.
    State.DATASET_READY: frozenset({State.FINETUNE_CREATED}) | _FINE_TUNING_OBSERVED,
    State.FINETUNE_CREATED: _FINE_TUNING_OBSERVED,
    State.VALIDATING: frozenset({State.TRAINING, State.SUCCEEDED}),
    State.TRAINING: frozenset({State.SUCCEEDED}),
}

TRANSITIONS_BY_API: dict[str, dict[State, frozenset[State]]] = {
    "finetune": TRANSITIONS,
    "fine_tuning": {
        state: _FINE_TUNING_FORWARD.get(state, frozenset()) | {State.FAILED, State.CANCELLED}
        if not state.terminal
        else TRANSITIONS[state]
        for state in State
    },
}


class IllegalTransition(RuntimeError):
    pass


def check_transition(old: State, new: State, api: str = "finetune") -> None:
    if new not in TRANSITIONS_BY_API[api][old]:
        raise IllegalTransition(f"{old} -> {new} is not an allowed transition ({api})")


@dataclass(frozen=True)
class JobRecord:
    """Everything the store keeps about one job. Never holds the API key or a signed URL."""

    name: str
    fingerprint: str
    state: State = State.PENDING
    manifest: str = ""
    base_url: str = ""
    provider: str = ""
    model: str = ""  # the base model
    attempt: int = 1  # part of the idempotency keys; a retry or replace starts a new one
    intent: str | None = None  # a non-idempotent call that may have happened
    content_sha256: str | None = None
    dataset_id: str | None = None
    s3_key: str | None = None
    upload_md5: str | None = None
    abandoned_datasets: tuple[str, ...] = ()
    finetune_id: str | None = None
    abandoned_finetunes: tuple[str, ...] = ()  # replaced or retried: cancelled, kept on record
    remote_status: str | None = None
    unknown_status_since: float | None = None  # remote_status is mapped to no phase
    fine_tuned_model: str | None = None
    usage: dict[str, Any] | None = None  # what the gateway reported of size: records, tokens
    error: str | None = None
    # Failed on our side (a deadline, an internal error), not by the gateway's word: what
    # the gateway made for this attempt may be alive, so a retry replays the same
    # idempotency keys and adopts it instead of making another.
    adoptable: bool = False
    poll_attempt: int = 0
    next_poll_at: float | None = None  # wall clock, so it survives a restart
    phase_started_at: float | None = None  # when validating/training began, for deadlines
    # The phase began before we saw it (adopted): its duration teaches the clock nothing.
    phase_adopted: bool = False
    training_started_at: float | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    api: str = "finetune"  # the dialect whose transition table the job follows
    last_event: str | None = None  # fine_tuning: the job's latest event message
    validation_file_id: str | None = None  # fine_tuning: its validation file, once uploaded
    # fine_tuning, a file sent in parts: {"name", "upload_id", "part_bytes", "parts"}, so
    # a restart goes on from the last part the endpoint took.
    upload_progress: dict[str, Any] | None = None

    def evolve(self, **changes: Any) -> JobRecord:
        """A copy with ``changes`` and a fresh ``updated_at``."""
        return replace(self, **changes, updated_at=time.time())

    def public(self) -> dict[str, Any]:
        """The shape of ``status --json`` and the daemon's ``/jobs``."""
        return {
            "name": self.name,
            "state": self.state.value,
            "provider": self.provider,
            "model": self.model,
            "dataset_id": self.dataset_id,
            "finetune_id": self.finetune_id,
            "remote_status": self.remote_status,
            "fine_tuned_model": self.fine_tuned_model,
            "error": self.error,
            "s3_key": self.s3_key,
            "abandoned_datasets": list(self.abandoned_datasets),
            "abandoned_finetunes": list(self.abandoned_finetunes),
            "unknown_status_since": _iso_or_none(self.unknown_status_since),
            "attempt": self.attempt,
            "manifest": self.manifest,
            "usage": self.usage,
            "created_at": iso_time(self.created_at),
            "training_started_at": _iso_or_none(self.training_started_at),
            "updated_at": iso_time(self.updated_at),
        }

    def result(self) -> dict[str, Any]:
        """One row of ``orchestrator results``: what a finished job hands on."""
        started, finished = self.training_started_at, self.updated_at
        usage = self.usage or {}
        return {
            "name": self.name,
            "manifest": self.manifest,
            "provider": self.provider,
            "base_model": self.model,
            "fine_tuned_model": self.fine_tuned_model,
            "state": self.state.value,
            "reason": self.error if self.state is State.FAILED else None,
            "submitted_at": iso_time(self.created_at),
            "training_started_at": _iso_or_none(started),
            "finished_at": iso_time(finished),
            "training_seconds": round(finished - started) if started else None,
            "records": usage.get("records"),
            "tokens": usage.get("tokens"),
            "units": usage.get("units"),
        }


@dataclass(frozen=True)
class Transition:
    name: str
    old: State | None
    new: State
    at: float
    detail: str | None = None


def iso_time(ts: float) -> str:
    """A wall-clock time as shown everywhere: ISO 8601, UTC, whole seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _iso_or_none(ts: float | None) -> str | None:
    return iso_time(ts) if ts is not None else None
