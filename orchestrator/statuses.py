"""The mapping from gateway status strings to lifecycle phases.

The default lives in ``configs/statuses.yaml`` (packaged into the wheel); a manifest's
``statuses:`` block replaces the strings of the phases it names.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import yaml


class Phase(enum.StrEnum):
    CREATED = "created"
    VALIDATING = "validating"
    VALIDATED = "validated"
    VALIDATION_FAILED = "validation_failed"
    TRAINING = "training"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


_PACKAGED = Path(__file__).parent / "configs" / "statuses.yaml"
_SOURCE_TREE = Path(__file__).parent.parent / "configs" / "statuses.yaml"


class StatusMap:
    def __init__(self, phases: Mapping[Phase, Sequence[str]]) -> None:
        self._phase_of: dict[str, Phase] = {}
        self._strings: dict[Phase, tuple[str, ...]] = {}
        for phase, strings in phases.items():
            self._strings[phase] = tuple(strings)
            for status in strings:
                self._phase_of[status] = phase

    def phase_of(self, status: str | None) -> Phase | None:
        """The phase of a status string, or None when it is unknown (still in progress)."""
        if status is None:
            return None
        return self._phase_of.get(status)

    def strings(self, phase: Phase) -> tuple[str, ...]:
        return self._strings.get(phase, ())

    def with_overrides(self, overrides: Mapping[Phase, Sequence[str]]) -> StatusMap:
        """A new map where each overridden phase has exactly the given strings."""
        moved = {s for strings in overrides.values() for s in strings}
        merged: dict[Phase, Sequence[str]] = {
            phase: [s for s in strings if s not in moved]
            for phase, strings in self._strings.items()
        }
        merged.update(overrides)
        return StatusMap(merged)

    def as_dict(self) -> dict[str, list[str]]:
        return {phase.value: list(strings) for phase, strings in self._strings.items()}


@cache
def default_status_map() -> StatusMap:
    path = _PACKAGED if _PACKAGED.exists() else _SOURCE_TREE
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    return StatusMap({Phase(name): list(strings) for name, strings in raw.items()})
