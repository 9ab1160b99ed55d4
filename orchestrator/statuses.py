"""The mapping from gateway status strings to lifecycle phases.

The default lives in ``configs/statuses.yaml`` (packaged into the wheel); a manifest's
``statuses:`` block adds strings to the phases it names. Strings match without regard
to case. A string mapped nowhere is *unknown*: never a verdict, only a reason to look
again (``suggestion`` says which line would map it).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path


class Phase(enum.StrEnum):
    CREATED = "created"
    VALIDATING = "validating"
    VALIDATED = "validated"
    VALIDATION_FAILED = "validation_failed"
    TRAINING = "training"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Seconds a status may stay unknown before it is shown with the line that would map it.
UNKNOWN_STATUS_NOTICE = 180.0

_PACKAGED = Path(__file__).parent / "configs" / "statuses.yaml"
_SOURCE_TREE = Path(__file__).parent.parent / "configs" / "statuses.yaml"


# What an unknown status most likely means, by the words in it; the phase the job is in
# decides the rest.
_HINTS = (
    ("cancel", Phase.CANCELLED),
    ("fail", Phase.FAILED),
    ("error", Phase.FAILED),
    ("success", Phase.SUCCEEDED),
    ("succeed", Phase.SUCCEEDED),
    ("complete", Phase.SUCCEEDED),
    ("done", Phase.SUCCEEDED),
)


class StatusMap:
    def __init__(self, phases: Mapping[Phase, Sequence[str]]) -> None:
        self._phase_of: dict[str, Phase] = {}
        self._strings: dict[Phase, tuple[str, ...]] = {}
        for phase, strings in phases.items():
            self._strings[phase] = tuple(strings)
            for status in strings:
                self._phase_of[status.lower()] = phase

    def phase_of(self, status: str | None) -> Phase | None:
        """The phase of a status string, or None when it is unknown (not a verdict)."""
        if not status:
            return None
        return self._phase_of.get(status) or self._phase_of.get(status.lower())

    def strings(self, phase: Phase) -> tuple[str, ...]:
        return self._strings.get(phase, ())

    def with_overrides(self, overrides: Mapping[Phase, Sequence[str]]) -> StatusMap:
        """A new map where each named phase also has the given strings (moved there from
        any other phase that had them)."""
        moved = {s.lower() for strings in overrides.values() for s in strings}
        merged: dict[Phase, list[str]] = {
            phase: [s for s in strings if s.lower() not in moved]
            for phase, strings in self._strings.items()
        }
        for phase, strings in overrides.items():
            merged.setdefault(phase, []).extend(strings)
        return StatusMap(merged)

    def as_dict(self) -> dict[str, list[str]]:
        return {phase.value: list(strings) for phase, strings in self._strings.items()}


def suggestion(status: str, waiting_for: Phase) -> str:
    """The manifest line that would map an unknown ``status``, seen while the job waits
    for ``waiting_for`` (validating or training)."""
    words = status.lower()
    phase = next((phase for hint, phase in _HINTS if hint in words), waiting_for)
    if waiting_for is Phase.VALIDATING:
        phase = {Phase.FAILED: Phase.VALIDATION_FAILED, Phase.SUCCEEDED: Phase.VALIDATED}.get(
            phase, phase
        )
    return f"statuses: {{{phase.value}: [{status}]}}"


@cache
def default_status_map() -> StatusMap:
    import yaml  # here: commands that never map a status never load the YAML parser

    path = _PACKAGED if _PACKAGED.exists() else _SOURCE_TREE
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return StatusMap({Phase(name): list(strings) for name, strings in raw.items()})
