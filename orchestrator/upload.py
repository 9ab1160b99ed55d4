"""Streaming a dataset to its signed URL: one PUT, exact Content-Length, flat memory.

The storage host gets only what the signed URL needs: a separate HTTP client with no
gateway headers and no redirects. MD5 is computed while streaming and checked against
the ETag, and SHA-256 too, so the caller can tell whether the bytes that went up are
the ones it checked. 5xx, timeouts, resets and an upload that stops making progress
restart the PUT from byte 0; an expired URL is reported as such so the lifecycle can
ask for a fresh dataset.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

import anyio
import anyio.to_thread

from orchestrator.errors import RetryableError, UploadError
from orchestrator.retry import call_with_retries
from orchestrator.sessions import HttpSession, NoAnswer, Reply, open_session
from orchestrator.settings import ClientSettings, UploadSettings

MAX_SINGLE_PUT = 5 * 1024**3
_S3_CODE = re.compile(rb"<Code>([^<]+)</Code>")
_S3_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")
_LABEL_S3 = re.compile(r"^s3([.-].*)?$")

ProgressCallback = Callable[[int], None]  # bytes sent since the last call; negative: restart


@dataclass(frozen=True)
class UploadResult:
    key: str
    md5: str
    sha256: str  # of the bytes sent
    size: int
    seconds: float
    attempts: int


def s3_key_from_url(url: str) -> str:
    """The object key of a presigned S3 URL, URL-decoded.

    Virtual-hosted (``https://BUCKET.s3.REGION.amazonaws.com/KEY``): the whole path.
    Path-style (``https://s3.REGION.amazonaws.com/BUCKET/KEY``, or a local S3 on
    ``http://127.0.0.1:PORT/BUCKET/KEY``): the path without the bucket.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    path = parts.path.lstrip("/")
    labels = host.split(".")
    s3_at = next((i for i, label in enumerate(labels) if _LABEL_S3.match(label)), -1)
    aws = host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")
    if not (aws and s3_at > 0):  # path-style: the first segment is the bucket
        _, _, path = path.partition("/")
    key = unquote(path)
    if not key:
        raise UploadError(f"signed URL has no object key: {redact_url(url)}")
    return key


def redact_url(url: str) -> str:
    """The URL without its query string (which holds the signature)."""
    return url.split("?", 1)[0] + ("?<redacted>" if "?" in url else "")


@asynccontextmanager
async def storage_client(settings: UploadSettings) -> AsyncIterator[HttpSession]:
    """A session for the storage host only: no gateway headers, no redirects, HTTP/1.1."""
    session = open_session(
        ClientSettings(
            connect_timeout=30.0,
            read_timeout=300.0,
            max_connections=settings.concurrency + settings.small_concurrency,
        )
    )
    try:
        yield session
    finally:
        await session.aclose()


class FileBody:
    """Exactly ``size`` bytes of a file as an async iterator, hashing as it reads.

    Each block is read and hashed in one worker-thread hop, so the event loop never
    spends milliseconds on MD5 and a 1 GiB file costs a few hundred hops.
    """

    def __init__(
        self,
        handle: BinaryIO,
        size: int,
        block: int,
        progress: ProgressCallback | None,
        hashes: tuple[Any, Any] | None = None,  # (md5, sha256) to go on updating
    ):
        self._handle, self._size, self._block = handle, size, block
        self._progress = progress
        md5, sha256 = hashes or (hashlib.md5(), hashlib.sha256())
        self.md5: Any = md5
        self.sha256: Any = sha256
        self.sent = 0
        self.on_block: Callable[[], None] = lambda: None  # a block is on its way

    def _read(self, n: int) -> bytes:
        data = self._handle.read(n)
        self.md5.update(data)
        self.sha256.update(data)
        return data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        remaining = self._size
        while remaining:
            data = await anyio.to_thread.run_sync(self._read, min(self._block, remaining))
            if not data:
                raise UploadError("the dataset file shrank while it was being uploaded")
            remaining -= len(data)
            self.sent += len(data)
            if self._progress:
                self._progress(len(data))
            self.on_block()
            yield data


def _size_and_small_body(path: Path, block: int) -> tuple[int, tuple[bytes, str, str] | None]:
    """The file's size and, when it fits in one block, its bytes, MD5 and SHA-256: a
    small dataset goes out as one buffer, read in one worker-thread hop."""
    size = path.stat().st_size
    if size > block:
        return size, None
    with path.open("rb") as handle:
        data = handle.read(size)
    if len(data) != size:
        raise UploadError("the dataset file shrank while it was being uploaded")
    return size, (data, hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest())


async def upload_dataset(
    storage: HttpSession,
    signed_url: str,
    path: Path,
    settings: UploadSettings,
    *,
    progress: ProgressCallback | None = None,
    rng: random.Random | None = None,
) -> UploadResult:
    """PUT ``path`` to ``signed_url``. Raises ``UploadError`` (``expired`` for a stale URL)."""
    size, small = await anyio.to_thread.run_sync(_size_and_small_body, path, settings.block_size)
    if size > MAX_SINGLE_PUT:
        raise UploadError(f"{path}: {size} bytes is over the 5 GiB limit of one S3 PUT")
    key = s3_key_from_url(signed_url)
    shown = redact_url(signed_url)
    started = time.monotonic()
    attempts = 0
    stall = settings.stall_timeout

    async def put(body: bytes | FileBody) -> Reply:
        # Bytes moving push the watchdog's deadline on; a transfer that stops for
        # ``stall`` seconds is cut and restarted instead of waiting out the deadline.
        with anyio.CancelScope(deadline=anyio.current_time() + stall) as watchdog:
            if isinstance(body, FileBody):
                body.on_block = lambda: setattr(watchdog, "deadline", anyio.current_time() + stall)
            try:
                # Content-Length explicit, or an iterator would go out chunked.
                return await storage.send("PUT", signed_url, body, {"Content-Length": str(size)})
            except NoAnswer as exc:
                _rewind(progress, size if isinstance(body, bytes) else body.sent)
                # Not the transport's words: they may quote the signed URL.
                what = "timed out" if exc.what == "timed out" else f"failed: {exc.cause}"
                raise RetryableError("upload", f"PUT {shown} {what}") from None
        _rewind(progress, size if isinstance(body, bytes) else body.sent)
        raise RetryableError("upload", f"PUT {shown} made no progress for {stall:g}s")

    async def attempt() -> tuple[str, str]:
        nonlocal attempts
        attempts += 1
        if small is not None:
            data, md5, sha256 = small
            if progress:
                progress(size)
            return _check_response(await put(data), md5, shown, progress, size), sha256
        # Opened and closed in worker threads too: nothing touches the disk on the loop.
        handle = await anyio.to_thread.run_sync(path.open, "rb")
        try:
            body = FileBody(handle, size, settings.block_size, progress)
            reply = await put(body)
        finally:
            with anyio.CancelScope(shield=True):  # closed even when the upload is cut
                await anyio.to_thread.run_sync(handle.close)
        md5 = _check_response(reply, body.md5.hexdigest(), shown, progress, body.sent)
        return md5, body.sha256.hexdigest()

    try:
        with anyio.fail_after(settings.deadline):
            md5, sha256 = await call_with_retries(settings.retry, attempt, rng=rng)
    except TimeoutError:
        raise UploadError(
            f"upload to {shown} did not finish within {settings.deadline:g}s"
        ) from None
    except RetryableError as exc:
        raise UploadError(
            f"upload to {shown} failed after {attempts} attempts: {exc.message}"
        ) from None
    return UploadResult(key, md5, sha256, size, time.monotonic() - started, attempts)


def _rewind(progress: ProgressCallback | None, sent: int) -> None:
    if progress and sent:
        progress(-sent)


def _check_response(
    reply: Reply, md5: str, shown: str, progress: ProgressCallback | None, sent: int
) -> str:
    status = reply.status
    if status in (500, 502, 503, 504) or status == 429:
        _rewind(progress, sent)
        raise RetryableError("upload", f"storage answered {status}", status)
    if status == 403:
        code, message = _s3_error(reply.body)
        expired = code == "AccessDenied" and "expired" in message.lower()
        raise UploadError(f"storage refused the upload: {code}: {message}", expired=expired)
    if status >= 300:
        code, message = _s3_error(reply.body)
        raise UploadError(f"storage answered {status}: {code}: {message}")
    etag = reply.headers.get("etag", "").strip('"')
    if etag and "-" not in etag and etag != md5:
        _rewind(progress, sent)
        raise RetryableError("upload", f"ETag {etag} does not match the MD5 sent ({md5})")
    return md5


def _s3_error(body: bytes) -> tuple[str, str]:
    code = _S3_CODE.search(body)
    message = _S3_MESSAGE.search(body)
    return (
        code.group(1).decode(errors="replace") if code else "Unknown",
        message.group(1).decode(errors="replace")
        if message
        else body[:200].decode(errors="replace"),
    )
