"""The HTTP contract of the second dialect: the OpenAI-compatible fine-tuning API
(``/v1/files``, ``/v1/uploads``, ``/v1/fine_tuning/jobs``), as the gateway's unified API
and OpenAI itself serve it.

Answers are bare JSON objects (no ``{success, data}`` envelope); errors are
``{"error": {"message", "type", "param", "code"}}``. What counts as unreadable, and
the retries, are ``gateway.GatewayClient``'s. There is no idempotency key here: the
creates are never retried blindly, and the lifecycle looks before it creates again
(jobs by their ``metadata``, files by name and size).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import UnreadableAnswer
from orchestrator.gateway import Endpoint, GatewayClient, GatewayModel, error_text
from orchestrator.sessions import Reply

UPLOAD_FILE = Endpoint("upload_file", "POST", "/v1/files", retry_blindly=False)
LIST_FILES = Endpoint("list_files", "GET", "/v1/files", retry_blindly=True)
# An upload made twice leaves one unused, which expires within the hour: no file exists
# before the completion, so the create may be repeated after a lost answer.
CREATE_UPLOAD = Endpoint("create_upload", "POST", "/v1/uploads", retry_blindly=True)
ADD_PART = Endpoint("add_upload_part", "POST", "/v1/uploads/{id}/parts", retry_blindly=False)
COMPLETE_UPLOAD = Endpoint(
    "complete_upload", "POST", "/v1/uploads/{id}/complete", retry_blindly=True
)
CREATE_JOB = Endpoint("create_job", "POST", "/v1/fine_tuning/jobs", retry_blindly=False)
GET_JOB = Endpoint("get_job", "GET", "/v1/fine_tuning/jobs/{id}", retry_blindly=True)
LIST_JOBS = Endpoint("list_jobs", "GET", "/v1/fine_tuning/jobs", retry_blindly=True)
CANCEL_JOB = Endpoint("cancel_job", "POST", "/v1/fine_tuning/jobs/{id}/cancel", retry_blindly=True)
JOB_EVENTS = Endpoint("job_events", "GET", "/v1/fine_tuning/jobs/{id}/events", retry_blindly=True)

MAX_FILE_BYTES = 512 * 1024**2  # /v1/files takes up to this; larger goes through /v1/uploads
PART_BYTES = 64 * 1024**2  # an Uploads API part may be at most this


class FileObject(GatewayModel):
    id: str
    bytes: int | None = None
    filename: str | None = None
    purpose: str | None = None
    status: str | None = None


class FineTuningJob(GatewayModel):
    id: str
    status: str | None = None
    model: str | None = None
    fine_tuned_model: str | None = None
    training_file: str | None = None
    error: Any = None
    estimated_finish: float | None = None
    trained_tokens: int | None = None
    finished_at: float | None = None
    metadata: dict[str, str] | None = None

    def failure_message(self) -> str | None:
        return error_text(self.error)

    def usage(self) -> dict[str, Any] | None:
        return {"tokens": self.trained_tokens} if self.trained_tokens else None


class JobEvent(GatewayModel):
    id: str | None = None
    created_at: float | None = None
    level: str | None = None
    message: str | None = None


class Upload(GatewayModel):
    id: str
    status: str | None = None
    file: FileObject | None = None


class UploadPart(GatewayModel):
    id: str


@dataclass(frozen=True)
class Route:
    """Which provider a call through the gateway goes to (not sent with bearer auth)."""

    provider: str
    virtual_key: str | None = field(default=None, repr=False)


class FineTuningClient(GatewayClient):
    """The OpenAI-compatible dialect on the same machinery (slots, retries, observer)."""

    def route_headers(self, route: Route | None) -> dict[str, str]:
        if route is None or self.auth != "portkey":
            return {}
        headers = {"x-portkey-provider": route.provider}
        if route.virtual_key:
            headers["x-portkey-virtual-key"] = route.virtual_key
        return headers

    # --------------------------------------------------------------------- files

    async def upload_file(
        self, filename: str, size: int, blocks: AsyncIterator[bytes], route: Route | None
    ) -> FileObject:
        """``POST /v1/files``, the file streamed in a multipart body of exact length."""
        body, headers = _multipart(
            "file", filename, "application/jsonl", size, blocks, {"purpose": "fine-tune"}
        )
        headers.update(self.route_headers(route))
        data = await self._call(UPLOAD_FILE, body=body, headers=headers)
        return self._parse(UPLOAD_FILE, FileObject, data)

    async def find_file(
        self, filename: str, size: int, route: Route | None, pages: int = 50
    ) -> FileObject | None:
        """A fine-tune file uploaded before under this name and size, among the newest
        ``pages`` hundred."""
        after: str | None = None
        for _ in range(pages):
            query = {"purpose": "fine-tune", "limit": "100", **({"after": after} if after else {})}
            page = await self._call(LIST_FILES, query=query, headers=self.route_headers(route))
            files = [self._parse(LIST_FILES, FileObject, f) for f in _items(LIST_FILES, page)]
            for file in files:
                if file.filename == filename and file.bytes == size:
                    return file
            if not files or not page.get("has_more"):
                return None
            after = files[-1].id
        return None

    # ------------------------------------------------------------------ uploads

    async def create_upload(self, filename: str, size: int, route: Route | None) -> Upload:
        body = {"filename": filename, "purpose": "fine-tune", "bytes": size,
                "mime_type": "application/jsonl"}  # fmt: skip
        data = await self._call(CREATE_UPLOAD, json=body, headers=self.route_headers(route))
        return self._parse(CREATE_UPLOAD, Upload, data)

    async def add_part(
        self, upload_id: str, size: int, blocks: AsyncIterator[bytes], route: Route | None
    ) -> UploadPart:
        body, headers = _multipart("data", "part", "application/octet-stream", size, blocks)
        headers.update(self.route_headers(route))
        data = await self._call(ADD_PART, upload_id, body=body, headers=headers)
        return self._parse(ADD_PART, UploadPart, data)

    async def complete_upload(
        self, upload_id: str, part_ids: list[str], md5: str, route: Route | None
    ) -> Upload:
        data = await self._call(
            COMPLETE_UPLOAD,
            upload_id,
            json={"part_ids": part_ids, "md5": md5},
            headers=self.route_headers(route),
        )
        return self._parse(COMPLETE_UPLOAD, Upload, data)

    # --------------------------------------------------------------------- jobs

    async def create_job(self, body: dict[str, Any], route: Route | None) -> FineTuningJob:
        data = await self._call(CREATE_JOB, json=body, headers=self.route_headers(route))
        return self._job(CREATE_JOB, data)

    async def get_job(self, job_id: str, route: Route | None) -> FineTuningJob:
        data = await self._call(GET_JOB, job_id, headers=self.route_headers(route))
        job = self._job(GET_JOB, data)
        if job.id != job_id:
            raise UnreadableAnswer(GET_JOB.name, f"answer is about {job.id!r}")
        return job

    async def find_jobs(
        self, metadata: Mapping[str, str], route: Route | None
    ) -> list[FineTuningJob]:
        """The jobs tagged with every one of these metadata pairs, newest first."""
        tagged = {f"metadata[{k}]": v for k, v in metadata.items()}
        found: list[FineTuningJob] = []
        after: str | None = None
        for _ in range(50):  # a server that ignores the filter is paged through, to a point
            query = {"limit": "100", **tagged, **({"after": after} if after else {})}
            page = await self._call(LIST_JOBS, query=query, headers=self.route_headers(route))
            jobs = [self._job(LIST_JOBS, item) for item in _items(LIST_JOBS, page)]
            # Another job is never taken for ours, whatever the server filtered.
            found += [
                j for j in jobs if all((j.metadata or {}).get(k) == v for k, v in metadata.items())
            ]
            if found or not jobs or not page.get("has_more"):
                break
            after = jobs[-1].id
        return found

    async def cancel_job(self, job_id: str, route: Route | None) -> FineTuningJob:
        data = await self._call(CANCEL_JOB, job_id, headers=self.route_headers(route))
        return self._job(CANCEL_JOB, data)

    async def job_events(self, job_id: str, route: Route | None, limit: int = 10) -> list[JobEvent]:
        """The job's latest events, oldest first."""
        page = await self._call(
            JOB_EVENTS, job_id, query={"limit": str(limit)}, headers=self.route_headers(route)
        )
        events = [self._parse(JOB_EVENTS, JobEvent, e) for e in _items(JOB_EVENTS, page)]
        return sorted(events, key=lambda e: e.created_at or 0)

    async def probe(self, attempts: int = 3) -> None:
        """One listing of jobs: proves the URL serves this dialect and takes the key."""
        await self._call(LIST_JOBS, query={"limit": "1"})

    # ---------------------------------------------------------------- machinery

    def _job(self, endpoint: Endpoint, data: Any) -> FineTuningJob:
        job = self._parse(endpoint, FineTuningJob, data)
        if not job.status:
            raise UnreadableAnswer(endpoint.name, "answer has no status")
        return job

    def _data(self, endpoint: Endpoint, reply: Reply, payload: Any) -> Any:
        """A bare JSON object is the answer (a job's ``error`` is one of its fields);
        anything else with a 2xx is unreadable."""
        return payload if isinstance(payload, dict) else None


def _multipart(
    name: str,
    filename: str,
    content_type: str,
    size: int,
    blocks: AsyncIterator[bytes],
    fields: Mapping[str, str] | None = None,
) -> tuple[AsyncIterator[bytes], dict[str, str]]:
    """A multipart/form-data body streaming ``size`` bytes of ``blocks`` as the file
    field ``name`` (after any plain ``fields``), and its headers: its exact length is
    known, so it never goes out chunked."""
    boundary = f"orchestrator-{os.urandom(12).hex()}"
    head = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'
        for key, value in (fields or {}).items()
    )
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
        f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    )
    tail = f"\r\n--{boundary}--\r\n".encode()
    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head.encode()) + size + len(tail)),
    }
    return _framed(head.encode(), blocks, tail), headers


async def _framed(head: bytes, blocks: AsyncIterator[bytes], tail: bytes) -> AsyncIterator[bytes]:
    yield head
    async for block in blocks:
        yield block
    yield tail


def _items(endpoint: Endpoint, page: Any) -> list[Any]:
    items = page.get("data") if isinstance(page, dict) else None
    if not isinstance(items, list):
        raise UnreadableAnswer(endpoint.name, "a list answer without its data")
    return items


__all__ = ["FileObject", "FineTuningClient", "FineTuningJob", "JobEvent", "Route"]
