"""A file over ``/v1/files``' 512 MB limit, through the Uploads API: one upload, then
64 MB parts, each streamed with an exact length and retried on its own, then the
completion with the part ids in order and the file's MD5. The record keeps the upload
and the parts the endpoint took, so a restart goes on from the next part.

A part that fails is sent again from its first byte; the hashes of the whole file go
back to where that part began, so MD5 and SHA-256 are of exactly the bytes that made
the file. A part whose answer was lost leaves an orphan part the completion does not
name. A resumed upload whose parts keep failing (expired at the endpoint) is started
afresh by the step's next attempt.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import anyio

from orchestrator.errors import RetryableError, UnreadableAnswer
from orchestrator.lifecycle import JobRun, Lifecycle
from orchestrator.openai_api import PART_BYTES, Route
from orchestrator.upload import FileBody


async def upload_in_parts(
    lc: Lifecycle, run: JobRun, path: Path, name: str, part_bytes: int = PART_BYTES
) -> tuple[str, str]:
    """(the file's id, SHA-256 of the bytes sent). Goes on with the upload the record
    says was under way for this file, from its next part."""
    assert lc.jobs is not None
    jobs = lc.jobs
    size = await anyio.to_thread.run_sync(lambda: path.stat().st_size)
    route = Route(run.spec.provider, run.spec.virtual_key or None)
    saved = run.record.upload_progress or {}
    resumed = saved.get("name") == name and saved.get("part_bytes") == part_bytes
    if resumed:
        upload_id, part_ids = saved["upload_id"], list(saved["parts"])
    else:
        upload_id, part_ids = (await jobs.create_upload(name, size, route)).id, []
    progress = lc.metrics.upload_progress(run.record.name, size)
    retry = lc.settings.upload.retry  # a part is retried as a whole upload is
    start = len(part_ids) * part_bytes
    # The parts sent before a restart are hashed again from the file, not sent again.
    md5, sha256 = await anyio.to_thread.run_sync(_hash_prefix, path, start)
    progress(start)
    handle = await anyio.to_thread.run_sync(path.open, "rb")
    try:
        for offset in range(start, size, part_bytes):
            length = min(part_bytes, size - offset)
            for attempt in range(1, retry.max_attempts + 1):
                lc.fence(run)  # each part is a call of its own
                hashes = md5.copy(), sha256.copy()  # kept as they are if this part fails
                await anyio.to_thread.run_sync(handle.seek, offset)
                body = FileBody(handle, length, lc.settings.upload.block_size, progress, hashes)
                try:
                    part = await jobs.add_part(upload_id, length, aiter(body), route)
                except RetryableError as exc:
                    progress(-body.sent)
                    if attempt == retry.max_attempts:
                        if resumed:  # the endpoint may have let it expire: afresh next time
                            await lc.persist(run, upload_progress=None)
                        raise
                    run.log.warning("upload part failed; sending it again", error=str(exc))
                    await anyio.sleep(retry.delay(attempt, exc.retry_after, lc.rng))
                    continue
                md5, sha256 = body.md5, body.sha256
                part_ids.append(part.id)
                break
            await lc.persist(
                run,
                upload_progress={
                    "name": name,
                    "upload_id": upload_id,
                    "part_bytes": part_bytes,
                    "parts": part_ids,
                },
            )
        done = await jobs.complete_upload(upload_id, part_ids, md5.hexdigest(), route)
    finally:
        lc.metrics.upload_finished(run.record.name)
        await anyio.to_thread.run_sync(handle.close)
    if done.file is None:
        raise UnreadableAnswer("complete_upload", "a completed upload without its file")
    await lc.persist(run, upload_progress=None)
    run.log.info("uploaded in parts", bytes=size, parts=len(part_ids), file_id=done.file.id)
    return done.file.id, sha256.hexdigest()


def _hash_prefix(path: Path, length: int) -> tuple[Any, Any]:
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with path.open("rb") as handle:
        while length > 0 and (block := handle.read(min(length, 4 * 1024 * 1024))):
            md5.update(block)
            sha256.update(block)
            length -= len(block)
    return md5, sha256
