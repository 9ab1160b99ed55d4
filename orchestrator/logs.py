"""Logging and redaction: structlog configured once, with one redaction processor
that every event passes, the standard library's log records included.

``Redactor`` is the one redaction for everything that leaves the process or is stored:
log events, error texts written to the state file, ``status`` output and the top-level
error line. It removes the API key (and any other registered secret), the values of
credential-like keys, the user and password in URLs, and the query strings of signed
URLs. Call sites need not remember anything.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

# A URL's query string (signatures live there), up to a space, quote, bracket or ")";
# one already redacted is left as it is.
_SIGNED_QUERY = re.compile(r"(https?://[^\s?\"'<>]+)\?(?!<redacted>)[^\s\"'<>)]*")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@\"'<>]+@")
_CREDENTIAL_KEYS = frozenset(
    {
        "api_key",
        "x-portkey-api-key",
        "authorization",
        "proxy-authorization",
        "signed_url",
        "cookie",
        "set-cookie",
    }
)
REDACTED = "***"
_PLAIN = frozenset({bool, int, float})  # nothing to hide in a number


class Redactor:
    """A structlog processor; ``add_secret`` registers values that must never be shown."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add_secret(self, value: str | None) -> None:
        if value and len(value) >= 4:  # shorter values would shred ordinary words
            self._secrets.add(value)

    def text(self, value: str) -> str:
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        if "://" in value:
            if "@" in value:
                value = _USERINFO.sub(r"\1***@", value)
            if "?" in value:
                value = _SIGNED_QUERY.sub(r"\1?<redacted>", value)
        return value

    def _clean(self, value: Any, key: str | None = None) -> Any:
        if value is None or type(value) in _PLAIN:
            return value
        if key is not None and key.lower() in _CREDENTIAL_KEYS:
            return REDACTED
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self._clean(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        if isinstance(value, BaseException):
            return self.text(f"{type(value).__name__}: {value}")
        return value

    def __call__(
        self, logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key in list(event):
            event[key] = self._clean(event[key], key)
        return event


def _json_line(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=repr).decode()


def configure_logging(
    redactor: Redactor,
    *,
    json_lines: bool | None = None,
    level: int = logging.INFO,
    stream: TextIO | None = None,
) -> None:
    """JSON lines when not a terminal (or when asked), readable console output otherwise."""
    stream = stream or sys.stderr
    if json_lines is None:
        json_lines = not stream.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_json_line)
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            redactor,  # after exception formatting, so tracebacks are redacted too
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        # A process configures logging once, before it logs: every logger may keep its
        # first configuration (an uncached one rebuilds itself on every call).
        cache_logger_on_first_use=True,
    )
    # Records of libraries that log through the standard library go the same way.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_log_level, stamp],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redactor,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(level, logging.WARNING))  # libraries' INFO would name full URLs
