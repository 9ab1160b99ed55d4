"""What carries bytes: an HTTP session for the gateway and one for the storage host.

``HttpSession`` sends one request and reads the whole answer; ``AiohttpSession`` is the
one implementation, aiohttp's client (the README's dependency table says why aiohttp).
Transport failures become ``NoAnswer`` with words a person can act on ("cannot connect
to 127.0.0.1:1: connection refused"). What the bytes mean (paths, envelopes, S3 errors)
is ``gateway``'s and ``upload``'s business, not this module's.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import yarl

from orchestrator.settings import ClientSettings

Body = bytes | AsyncIterable[bytes] | None


@dataclass(frozen=True)
class Reply:
    """An HTTP answer, read whole: gateway envelopes and S3 answers are small."""

    status: int
    body: bytes
    reason: str
    headers: Mapping[str, str]  # case-insensitive in both implementations


class NoAnswer(Exception):
    """No HTTP answer came back. ``what`` is "timed out" or "connection failed"; the
    message says what happened in plain words and never holds a URL's query string."""

    def __init__(self, what: str, cause: Exception) -> None:
        super().__init__(_plain_words(what, cause))
        self.what = what
        self.cause = type(cause).__name__


def _plain_words(what: str, cause: Exception) -> str:
    if isinstance(cause, aiohttp.ClientConnectorError):
        error = cause.os_error
        # errno's words ("connection refused"); a failed name lookup has its own.
        code = error.errno or 0
        reason = os.strerror(code) if code > 0 else error.strerror or str(error) or "failed"
        return f"cannot connect to {cause.host}:{cause.port}: {reason.lower()}"
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        return "the server closed the connection without answering"
    if what == "timed out":
        return "timed out waiting for an answer"
    return f"{what} ({type(cause).__name__})"


class HttpSession(Protocol):
    async def send(
        self, method: str, url: str, body: Body = None, headers: Mapping[str, str] | None = None
    ) -> Reply:
        """``url`` is joined to the session's base URL; it must be quoted already."""

    async def aclose(self) -> None: ...


class AiohttpSession:
    """aiohttp's client, opened on first use (it wants a running event loop)."""

    def __init__(self, base_url: str, headers: Mapping[str, str], settings: ClientSettings):
        self._base = base_url
        self._headers = dict(headers)
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            s = self._settings
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=s.max_connections, limit_per_host=0),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=s.connect_timeout, sock_read=s.read_timeout
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def send(
        self, method: str, url: str, body: Body = None, headers: Mapping[str, str] | None = None
    ) -> Reply:
        # encoded=True: the URL goes out byte for byte, so a signature over it still holds.
        target = yarl.URL(self._base + url, encoded=True)
        try:
            async with self._open().request(
                method, target, data=body, headers=headers, allow_redirects=False
            ) as response:
                data = await response.read()
        except TimeoutError as exc:  # before ClientError: ServerTimeoutError is both
            raise NoAnswer("timed out", exc) from None
        except aiohttp.ClientError as exc:
            raise NoAnswer("connection failed", exc) from None
        return Reply(response.status, data, response.reason or "", response.headers)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def open_session(
    settings: ClientSettings, base_url: str = "", headers: Mapping[str, str] | None = None
) -> HttpSession:
    """A session for ``base_url``; close it with ``aclose``."""
    return AiohttpSession(base_url, headers or {}, settings)
