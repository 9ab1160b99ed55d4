"""Local dataset checks: one streaming pass that validates a chat-format JSONL file
and hashes it, before anything leaves the machine.

Errors make the job fail without touching the gateway; warnings are for what a
provider may reject. Every problem names the file and the line.
"""

from __future__ import annotations

import hashlib
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


def inspect_dataset(path: Path, settings: CheckSettings | None = None) -> DatasetReport:
    """Validate and hash ``path`` in one pass, in flat memory. Never raises on bad data."""
    settings = settings or CheckSettings()
    report = DatasetReport(path)
    shown = str(path)

    def error(line: int, message: str) -> None:
        if len(report.errors) < MAX_REPORTED:
            report.errors.append(f"{shown}:{line}: {message}")
        else:
            report.more_errors += 1

    def warn(line: int, message: str) -> None:
        if len(report.warnings) < MAX_REPORTED:
            report.warnings.append(f"{shown}:{line}: {message}")

    digest = hashlib.sha256()
    number = 0  # lines seen so far
    carry = bytearray()  # grows in place: a long line costs no quadratic copying
    skipping = False  # inside a line too long to hold
    try:
        handle = path.open("rb")
    except OSError as exc:
        report.errors.append(f"{shown}: cannot read: {exc.strerror}")
        return report
    with handle:
        report.size = size = handle.seek(0, 2)
        handle.seek(0)
        if size > MAX_OBJECT_BYTES:
            report.errors.append(f"{shown}: {size} bytes is over the 5 GiB limit of one S3 upload")
            return report
        while True:
            block = handle.read(BLOCK)
            if not block:
                break
            digest.update(block)
            cut = block.rfind(b"\n")
            if cut < 0:
                carry += block
                if len(carry) > MAX_LINE_BYTES and not skipping:
                    skipping = True
                    error(number + 1, f"line longer than {MAX_LINE_BYTES} bytes")
                if skipping:
                    carry.clear()
                continue
            if carry and not skipping and len(carry) + block.find(b"\n") > MAX_LINE_BYTES:
                error(number + 1, f"line longer than {MAX_LINE_BYTES} bytes")
                carry.clear()  # its tail, up to the newline, is dropped below
                skipping = True
            lines = (carry + block[: cut + 1]).split(b"\n")
            lines.pop()  # the empty piece after the last newline
            carry = bytearray(block[cut + 1 :])
            if skipping:  # the first piece is the tail of the overlong line
                number += 1
                skipping = False
                lines = lines[1:]
            number = _check_lines(lines, number, settings, report, error, warn)
        if carry and not skipping:
            number = _check_lines([bytes(carry)], number, settings, report, error, warn)
    report.sha256 = digest.hexdigest()
    if report.examples == 0 and not report.errors:
        error(max(number, 1), "dataset has no examples")
    elif report.examples < settings.min_examples and not report.errors:
        error(
            max(number, 1),
            f"only {report.examples} examples; at least {settings.min_examples} are required",
        )
    return report


def _check_lines(
    lines: list[bytes] | list[bytearray],
    number: int,
    settings: CheckSettings,
    report: DatasetReport,
    error: Any,
    warn: Any,
) -> int:
    long_bytes = settings.long_example_chars  # bytes >= characters: a cheap upper bound
    loads = orjson.loads  # parses and checks UTF-8 in one pass, several times faster
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
                    error(number, f"not valid UTF-8 (byte {bad.start + 1})")
                    continue
                error(number, "not valid UTF-8 (a lone surrogate escape)")
                continue
            error(number, f"not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        problem, warnings = check_example(record)
        if problem:
            error(number, problem)
            continue
        report.examples += 1
        for message in warnings:
            warn(number, message)
        if len(raw) > long_bytes and len(raw.decode("utf-8")) > long_bytes:
            warn(number, f"example is {len(raw)} bytes; providers may reject it")
    return number
