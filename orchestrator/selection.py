"""Which jobs a command is about: names and globs, ``--where KEY=VALUE`` and
``--manifest FILE``, the same for ``status``, ``results`` and ``forget``."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import InputError
from orchestrator.states import JobRecord, State

WHERE_KEYS = ("state", "provider", "model", "remote_status", "manifest")


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


@dataclass(frozen=True)
class Selection:
    patterns: tuple[str, ...] = ()  # names or globs; none: every job
    where: tuple[tuple[str, str], ...] = ()
    manifest: str | None = None  # the absolute path a job was recorded from

    @classmethod
    def parse(
        cls, patterns: Sequence[str], where: Sequence[str], manifest: Path | None
    ) -> Selection:
        pairs = []
        for condition in where:
            key, sep, value = condition.partition("=")
            if not sep or key not in WHERE_KEYS:
                raise InputError(
                    f"--where {condition}: expected KEY=VALUE with KEY one of "
                    + ", ".join(WHERE_KEYS)
                )
            if key == "state" and value not in {s.value for s in State}:
                raise InputError(
                    f"--where {condition}: no such state; one of "
                    + ", ".join(s.value for s in State)
                )
            pairs.append((key, value))
        shown = os.path.abspath(manifest) if manifest is not None else None
        return cls(tuple(patterns), tuple(pairs), shown)

    @property
    def exact_names(self) -> list[str]:
        """The patterns that name one job each (a missing one is an error)."""
        return [p for p in self.patterns if not is_glob(p)]

    def matches(self, record: JobRecord) -> bool:
        if self.patterns and not any(fnmatch.fnmatchcase(record.name, p) for p in self.patterns):
            return False
        if self.manifest is not None and os.path.abspath(record.manifest) != self.manifest:
            return False
        values = {
            "state": record.state.value,
            "provider": record.provider,
            "model": record.model,
            "remote_status": record.remote_status or "",
            "manifest": record.manifest,
        }
        return all(values[key] == value for key, value in self.where)

    def pick(self, records: Iterable[JobRecord], where: object) -> list[JobRecord]:
        """The matching records by name; a plain name with no job is an InputError."""
        chosen = sorted((r for r in records if self.matches(r)), key=lambda r: r.name)
        known = {r.name for r in chosen}
        missing = [n for n in self.exact_names if n not in known]
        if missing and not self.where and self.manifest is None:
            raise InputError(f"no such job in {where}: {', '.join(missing)}")
        return chosen
