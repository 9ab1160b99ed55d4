"""Local dataset checks: one streaming pass that validates a chat-format JSONL file
and hashes it, before anything leaves the machine.

Errors make the job fail without touching the gateway; warnings are for what a
provider may reject. Every problem names the file and the line.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from orchestrator.settings import CheckSettings

ROLES = frozenset({"system", "user", "assistant"})
MESSAGE_KEYS = frozenset({"role", "content", "name", "weight"})
BLOCK = 1024 * 1024  # small enough to keep memory flat, large enough to cost nothing
MAX_LINE_BYTES = 64 * 1024 * 1024  # one example larger than this is refused, unread
MAX_REPORTED = 20
PARALLEL_BYTES = 64 * 1024 * 1024  # below this, one process is done before others start
MAX_OBJECT_BYTES = 5 * 1024**3  # S3's limit for one PUT


@dataclass
class DatasetReport:
    path: Path
    size: int = 0
    sha256: str = ""
    examples: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    more_errors: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        """The first error, and how many more there are: what a job's error shows."""
        if not self.errors:
            return ""
        extra = len(self.errors) - 1 + self.more_errors
        return self.errors[0] + (f" (and {extra} more problems)" if extra else "")


def check_example(record: Any) -> tuple[str | None, list[str]]:
    """The problem with one parsed line (or None), and warnings about it."""
    if not isinstance(record, dict):
        return "expected a JSON object", []
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list", []
    warnings: list[str] = []
    previous = None
    has_assistant = False
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{index}] must be an object", warnings
        role = message.get("role")
        if role not in ROLES:
            if role is None:
                return f"messages[{index}] has no 'role'", warnings
            return (
                f"messages[{index}].role {role!r} is not one of system, user, assistant",
                warnings,
            )
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            return f"messages[{index}].content must be a non-empty string", warnings
        if len(message) > 2:
            unknown = set(message) - MESSAGE_KEYS
            if unknown:
                return f"messages[{index}] has unknown key {sorted(unknown)[0]!r}", warnings
            weight = message.get("weight")
            if "weight" in message and (weight not in (0, 1) or isinstance(weight, bool)):
                return f"messages[{index}].weight must be 0 or 1", warnings
        if role == "assistant":
            has_assistant = True
        elif role == previous:
            warnings.append(f"messages[{index}] repeats role {role!r}")
        previous = role
    if not has_assistant:
        return "no assistant message", warnings
    return None, warnings


@dataclass
class _Partial:
    """What one byte range of a file held; line numbers local to the range."""

    lines: int = 0
    examples: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    warnings: list[tuple[int, str]] = field(default_factory=list)
    more_errors: int = 0

    def error(self, line: int, message: str) -> None:
        if len(self.errors) < MAX_REPORTED:
            self.errors.append((line, message))
        else:
            self.more_errors += 1

    def warn(self, line: int, message: str) -> None:
        if len(self.warnings) < MAX_REPORTED:
            self.warnings.append((line, message))


def inspect_dataset(
    path: Path,
    settings: CheckSettings | None = None,
    *,
    workers: int | None = None,
    parallel_bytes: int = PARALLEL_BYTES,
) -> DatasetReport:
    """Validate and hash ``path`` in one pass, in flat memory. Never raises on bad data.

    A large file is checked in ``workers`` processes, each over a range of whole lines,
    while this thread computes the SHA-256 (hashlib releases the GIL): the JSON parsing,
    not the disk, is what limits a single process.
    """
    settings = settings or CheckSettings()
    report = DatasetReport(path)
    shown = str(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        report.errors.append(f"{shown}: cannot read: {exc.strerror}")
        return report
    report.size = size
    if size > MAX_OBJECT_BYTES:
        report.errors.append(f"{shown}: {size} bytes is over the 5 GiB limit of one S3 upload")
        return report
    workers = workers or min(4, os.cpu_count() or 1)
    try:
        if workers > 1 and size >= parallel_bytes:
            partials, report.sha256 = _scan_in_processes(path, size, settings, workers)
        else:
            digest = hashlib.sha256()
            partials = [_scan(path, 0, size, settings, digest)]
            report.sha256 = digest.hexdigest()
    except OSError as exc:
        report.errors.append(f"{shown}: cannot read: {exc.strerror}")
        return report
    offset = 0
    errors: list[tuple[int, str]] = []
    for partial in partials:
        errors += [(offset + line, message) for line, message in partial.errors]
        report.warnings += [
            f"{shown}:{offset + line}: {message}" for line, message in partial.warnings
        ]
        report.examples += partial.examples
        report.more_errors += partial.more_errors
        offset += partial.lines
    report.more_errors += max(0, len(errors) - MAX_REPORTED)
    report.errors = [f"{shown}:{line}: {message}" for line, message in errors[:MAX_REPORTED]]
    del report.warnings[MAX_REPORTED:]
    if report.examples == 0 and not report.errors:
        report.errors.append(f"{shown}:{max(offset, 1)}: dataset has no examples")
    elif report.examples < settings.min_examples and not report.errors:
        report.errors.append(
            f"{shown}:{max(offset, 1)}: only {report.examples} examples; "
            f"at least {settings.min_examples} are required"
        )
    return report


def _line_starts(path: Path, size: int, parts: int) -> list[int]:
    """Offsets splitting the file into ``parts`` ranges that each begin a line."""
    starts = [0]
    with path.open("rb") as handle:
        for i in range(1, parts):
            handle.seek(max(size * i // parts, starts[-1]))
            while True:  # to just after the next newline
                block = handle.read(BLOCK)
                if not block:
                    return starts
                cut = block.find(b"\n")
                if cut >= 0:
                    starts.append(handle.tell() - len(block) + cut + 1)
                    break
    return starts


def _scan_in_processes(
    path: Path, size: int, settings: CheckSettings, workers: int
) -> tuple[list[_Partial], str]:
    starts = _line_starts(path, size, workers)
    ends = [*starts[1:], size]
    context = multiprocessing.get_context("forkserver")  # safe beside the event loop's threads
    with ProcessPoolExecutor(len(starts), mp_context=context) as pool:
        futures = [
            pool.submit(_scan, path, start, end, settings)
            for start, end in zip(starts, ends, strict=True)
        ]
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(BLOCK * 4):
                digest.update(block)
        return [future.result() for future in futures], digest.hexdigest()


def _scan(
    path: Path,
    start: int,
    end: int,
    settings: CheckSettings,
    digest: Any = None,
) -> _Partial:
    """Check the whole lines in ``[start, end)``, hashing them too when given a digest."""
    partial = _Partial()
    carry = bytearray()  # grows in place: a long line costs no quadratic copying
    skipping = False  # inside a line too long to hold
    with path.open("rb") as handle:
        handle.seek(start)
        remaining = end - start
        while remaining > 0:
            block = handle.read(min(BLOCK, remaining))
            if not block:
                break
            remaining -= len(block)
            if digest is not None:
                digest.update(block)
            cut = block.rfind(b"\n")
            if cut < 0:
                carry += block
                if len(carry) > MAX_LINE_BYTES and not skipping:
                    skipping = True
                    partial.error(partial.lines + 1, f"line longer than {MAX_LINE_BYTES} bytes")
                if skipping:
                    carry.clear()
                continue
            if carry and not skipping and len(carry) + block.find(b"\n") > MAX_LINE_BYTES:
                partial.error(partial.lines + 1, f"line longer than {MAX_LINE_BYTES} bytes")
                carry.clear()  # its tail, up to the newline, is dropped below
                skipping = True
            lines = (carry + block[: cut + 1]).split(b"\n")
            lines.pop()  # the empty piece after the last newline
            carry = bytearray(block[cut + 1 :])
            if skipping:  # the first piece is the tail of the overlong line
                partial.lines += 1
                skipping = False
                lines = lines[1:]
            _check_lines(lines, settings, partial)
        if carry and not skipping:
            _check_lines([bytes(carry)], settings, partial)
    return partial


def _check_lines(
    lines: list[bytes] | list[bytearray], settings: CheckSettings, partial: _Partial
) -> None:
    long_bytes = settings.long_example_chars  # bytes >= characters: a cheap upper bound
    loads = orjson.loads  # parses and checks UTF-8 in one pass, several times faster
    number = partial.lines
    for raw in lines:
        number += 1
        if not raw or raw.isspace():
            continue
        try:
            record = loads(raw)
        except orjson.JSONDecodeError as exc:
            if "UTF-8" in str(exc):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as bad:
                    partial.error(number, f"not valid UTF-8 (byte {bad.start + 1})")
                    continue
                partial.error(number, "not valid UTF-8 (a lone surrogate escape)")
                continue
            partial.error(number, f"not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        problem, warnings = check_example(record)
        if problem:
            partial.error(number, problem)
            continue
        partial.examples += 1
        for message in warnings:
            partial.warn(number, message)
        if len(raw) > long_bytes and len(raw.decode("utf-8")) > long_bytes:
            partial.warn(number, f"example is {len(raw)} bytes; providers may reject it")
    partial.lines = number
