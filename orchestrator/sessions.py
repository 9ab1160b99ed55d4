"""What carries bytes: an HTTP session for the gateway and one for the storage host.

``HttpSession`` sends one request and reads the whole answer. ``AiohttpSession`` (the
default) is aiohttp's client; ``HttpxSession`` is an ``httpx.AsyncClient``, over aiohttp's
pool or httpx's own. `make bench` measures the CPU per request of each: under hundreds
of concurrent small requests httpx's client costs about three times aiohttp's, and that
was most of the orchestrator's CPU. What the bytes mean (paths, envelopes, S3 errors)
is ``gateway``'s and ``upload``'s business, not this module's.
"""

from __future__ import annotations

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
    message is the transport's own words, which may name the URL."""

    def __init__(self, what: str, cause: Exception) -> None:
        super().__init__(str(cause) or f"{what} ({type(cause).__name__})")
        self.what = what
        self.cause = type(cause).__name__


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


class HttpxSession:
    """An ``httpx.AsyncClient``: over aiohttp's pool (``httpx``) or httpcore's
    (``httpx-httpcore``)."""

    def __init__(self, base_url: str, headers: Mapping[str, str], settings: ClientSettings):
        import httpx  # imported here: ~25 ms at start for a client few runs use
        from httpx_aiohttp import AiohttpTransport

        self._timeout_error = httpx.TimeoutException
        self._transport_error = httpx.TransportError

        s = settings
        limits = httpx.Limits(
            max_connections=s.max_connections, max_keepalive_connections=s.max_keepalive
        )
        self.client = httpx.AsyncClient(
            base_url=base_url,
            transport=AiohttpTransport(limits=limits) if s.http_client == "httpx" else None,
            headers=dict(headers),
            timeout=httpx.Timeout(
                connect=s.connect_timeout,
                read=s.read_timeout,
                write=s.write_timeout,
                pool=s.pool_timeout,
            ),
            limits=limits,
            follow_redirects=False,
        )

    async def send(
        self, method: str, url: str, body: Body = None, headers: Mapping[str, str] | None = None
    ) -> Reply:
        try:
            response = await self.client.request(method, url, content=body, headers=headers)
        except self._timeout_error as exc:
            raise NoAnswer("timed out", exc) from None
        except self._transport_error as exc:
            raise NoAnswer("connection failed", exc) from None
        return Reply(
            response.status_code, response.content, response.reason_phrase, response.headers
        )

    async def aclose(self) -> None:
        await self.client.aclose()


def open_session(
    settings: ClientSettings, base_url: str = "", headers: Mapping[str, str] | None = None
) -> HttpSession:
    """The session ``settings.http_client`` names; close it with ``aclose``."""
    if settings.http_client == "aiohttp":
        return AiohttpSession(base_url, headers or {}, settings)
    return HttpxSession(base_url, headers or {}, settings)
