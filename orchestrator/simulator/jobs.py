"""The simulator's second dialect: the OpenAI-compatible fine-tuning API (files,
uploads in parts, fine_tuning jobs with metadata, events), with OpenAI's shapes, so the
official ``openai`` client parses every answer.

Like the finetune flow, a job advances lazily on each read, its file is checked for
real (in a thread) when it is created, and the journal counts creates per job name
(the ``orchestrator_job`` tag, else the job id): the witness that a lost answer never
led to a second create. There is no idempotency key in this API.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import BodyPartReader, web

from orchestrator.simulator import world as w

if TYPE_CHECKING:
    from orchestrator.simulator.server import Simulator

PATHS = ("/v1/files", "/v1/uploads", "/v1/fine_tuning/")
MAX_FILE_BYTES = 512 * 1024**2
MAX_PART_BYTES = 64 * 1024**2


def is_openai_path(path: str) -> bool:
    return path.startswith(PATHS)


def error(
    status: int,
    message: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


@dataclass
class SimFile:
    id: str
    filename: str
    path: Path
    bytes: int
    purpose: str
    created_at: int = field(default_factory=lambda: int(time.time()))

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass
class SimUpload:
    id: str
    filename: str
    bytes: int
    purpose: str
    parts: dict[str, Path] = field(default_factory=dict)
    status: str = "pending"
    file: SimFile | None = None
    created_at: int = field(default_factory=lambda: int(time.time()))

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "upload",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": self.status,
            "expires_at": self.created_at + 3600,
            "file": self.file.as_json() if self.file else None,
        }


@dataclass
class SimJob:
    id: str
    name: str  # what the journal counts creates by
    model: str
    training_file: str
    suffix: str | None
    seed: int
    metadata: dict[str, str]
    hyperparameters: dict[str, Any]
    validation_file: str | None = None
    status: str = "validating_files"
    created_at: int = field(default_factory=lambda: int(time.time()))
    validated_at: float | None = None  # monotonic: when validation ends
    problem: str | None = None
    checked: bool = False
    records: int = 0
    will_fail: bool = False
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    error: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)


class JobsWorld:
    """Files, uploads and jobs; statuses advance on each read."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.files: dict[str, SimFile] = {}
        self.uploads: dict[str, SimUpload] = {}
        self.jobs: dict[str, SimJob] = {}

    def _id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.UUID(int=self.sim.world.rng.getrandbits(128)).hex[:24]}"

    def event(self, job: SimJob, message: str, level: str = "info") -> None:
        job.events.append(
            {
                "object": "fine_tuning.job.event",
                "id": self._id("ftevent"),
                "created_at": int(time.time()),
                "level": level,
                "message": message,
                "data": {},
                "type": "message",
            }
        )

    def advance(self, job: SimJob) -> None:
        cfg, now = self.sim.config, time.monotonic()
        if job.status == "validating_files" and job.checked and now >= (job.validated_at or 0):
            if job.problem:
                job.status, job.finished_at = "failed", int(time.time())
                job.error = {
                    "code": "invalid_training_file",
                    "message": job.problem,
                    "param": "training_file",
                }
                self.event(job, f"Training file validation failed: {job.problem}", "error")
            else:
                job.status = "queued"
                self.event(job, "Files validated, job queued")
        start = (job.validated_at or 0) + cfg.queue_seconds
        if job.status == "queued" and now >= start:
            job.status = "running"
            self.event(job, "Fine-tuning job started")
        if job.status == "running" and now >= start + cfg.training_seconds:
            job.finished_at = int(time.time())
            if job.will_fail:
                job.status = "failed"
                job.error = {
                    "code": "training_failed",
                    "param": None,
                    "message": "provider training job failed (injected training failure)",
                }
                self.event(job, "Fine-tuning job failed", "error")
            else:
                job.status = "succeeded"
                job.fine_tuned_model = f"ft:{job.model}:{job.suffix or 'personal'}:{job.id[-8:]}"
                self.event(job, "The job has successfully completed")

    def as_json(self, job: SimJob) -> dict[str, Any]:
        self.advance(job)
        cfg = self.sim.config
        estimated = None
        if job.status in ("queued", "running") and job.validated_at is not None:
            left = job.validated_at + cfg.queue_seconds + cfg.training_seconds - time.monotonic()
            estimated = int(time.time() + max(left, 0)) + 1
        epochs = job.hyperparameters.get("n_epochs", "auto")
        return {
            "object": "fine_tuning.job",
            "id": job.id,
            "model": job.model,
            "created_at": job.created_at,
            "finished_at": job.finished_at,
            "fine_tuned_model": job.fine_tuned_model,
            "organization_id": "org-simulator",
            "result_files": [],
            "status": job.status,
            "validation_file": job.validation_file,
            "training_file": job.training_file,
            "hyperparameters": {
                "n_epochs": epochs,
                "batch_size": job.hyperparameters.get("batch_size", "auto"),
                "learning_rate_multiplier": job.hyperparameters.get(
                    "learning_rate_multiplier", "auto"
                ),
            },
            "trained_tokens": job.records * 50 if job.status == "succeeded" else None,
            "error": job.error,
            "seed": job.seed,
            "estimated_finish": estimated,
            "integrations": [],
            "metadata": job.metadata or None,
            "user_provided_suffix": job.suffix,
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": dict(job.hyperparameters)},
            },
        }


class FineTuningRoutes:
    """The dialect's HTTP handlers, through the simulator's faults and journal."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.world = JobsWorld(sim)

    def add(self, router: web.UrlDispatcher) -> None:
        r = router
        r.add_post("/v1/files", self._guard("upload_file", self.upload_file))
        r.add_get("/v1/files", self._guard("list_files", self.list_files))
        r.add_get("/v1/files/{id}", self._guard("get_file", self.get_file))
        r.add_post("/v1/uploads", self._guard("create_upload", self.create_upload))
        r.add_post("/v1/uploads/{id}/parts", self._guard("add_upload_part", self.add_part))
        r.add_post("/v1/uploads/{id}/complete", self._guard("complete_upload", self.complete))
        r.add_post("/v1/fine_tuning/jobs", self._guard("create_job", self.create_job))
        r.add_get("/v1/fine_tuning/jobs", self._guard("list_jobs", self.list_jobs))
        r.add_get("/v1/fine_tuning/jobs/{id}", self._guard("get_job", self.get_job))
        r.add_post("/v1/fine_tuning/jobs/{id}/cancel", self._guard("cancel_job", self.cancel))
        r.add_get("/v1/fine_tuning/jobs/{id}/events", self._guard("job_events", self.events))

    def _guard(
        self, name: str, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def guarded(request: web.Request) -> web.Response:
            from orchestrator.simulator.server import ENDPOINT

            self.sim.journal.requests[name] += 1
            request[ENDPOINT] = name
            try:
                return await handler(request)
            except w.BadRequest as exc:
                return error(400, str(exc))
            except w.Missing as exc:
                return error(404, str(exc), code="not_found")

        return guarded

    # --------------------------------------------------------------------- files

    async def _receive(
        self, request: web.Request, field_name: str, limit: int
    ) -> tuple[Path, int, str, dict[str, str]]:
        """The multipart field ``field_name`` streamed to disk: (path, size, its file
        name, the other fields' values)."""
        if not request.content_type.startswith("multipart/form-data"):
            raise w.BadRequest("expected multipart/form-data")
        reader = await request.multipart()
        target = self.sim.world.objects_dir / f"upload-{secrets.token_hex(8)}"
        size, filename, others = 0, None, {}
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == field_name:
                filename = part.filename or "file"
                with target.open("wb") as out:
                    while block := await part.read_chunk(1024 * 1024):
                        size += len(block)
                        if size > limit:
                            raise w.BadRequest(f"{field_name} is larger than {limit} bytes")
                        out.write(block)
            elif part.name:
                others[part.name] = (await part.text()).strip()
        if filename is None:
            raise w.BadRequest(f"the multipart field {field_name!r} is missing")
        return target, size, filename, others

    async def upload_file(self, request: web.Request) -> web.Response:
        path, size, filename, others = await self._receive(request, "file", MAX_FILE_BYTES)
        purpose = others.get("purpose", "")
        if purpose != "fine-tune":
            raise w.BadRequest(f"purpose must be fine-tune, not {purpose!r}")
        file = SimFile(self.world._id("file"), filename, path, size, purpose)
        self.world.files[file.id] = file
        self.sim.journal.uploads += 1
        self.sim.journal.upload_bytes += size
        self.sim.journal.dataset_creates[file.filename] += 1
        return web.json_response(file.as_json())

    async def list_files(self, request: web.Request) -> web.Response:
        purpose = request.query.get("purpose")
        files = sorted(self.world.files.values(), key=lambda f: (f.created_at, f.id), reverse=True)
        files = [f for f in files if purpose is None or f.purpose == purpose]
        return web.json_response(_page(files, request, lambda f: f.as_json()))

    async def get_file(self, request: web.Request) -> web.Response:
        return web.json_response(self._file(request.match_info["id"]).as_json())

    def _file(self, file_id: str) -> SimFile:
        try:
            return self.world.files[file_id]
        except KeyError:
            raise w.Missing(f"No such File object: {file_id}") from None

    # ------------------------------------------------------------------- uploads

    async def create_upload(self, request: web.Request) -> web.Response:
        body = await self.sim._body(request)
        size = body.get("bytes")
        if not isinstance(size, int) or size <= 0:
            raise w.BadRequest("bytes must be a positive integer")
        if body.get("purpose") != "fine-tune":
            raise w.BadRequest("purpose must be fine-tune")
        filename = w._require_strings(body, "filename", "mime_type")["filename"]
        upload = SimUpload(self.world._id("upload"), filename, size, "fine-tune")
        self.world.uploads[upload.id] = upload
        return web.json_response(upload.as_json())

    async def add_part(self, request: web.Request) -> web.Response:
        upload = self._upload(request.match_info["id"])
        if upload.status != "pending":
            raise w.BadRequest(f"upload {upload.id} is {upload.status}")
        path, size, _, _ = await self._receive(request, "data", MAX_PART_BYTES)
        part_id = self.world._id("part")
        upload.parts[part_id] = path
        self.sim.journal.upload_bytes += size
        return web.json_response(
            {
                "id": part_id,
                "object": "upload.part",
                "created_at": int(time.time()),
                "upload_id": upload.id,
            }
        )

    async def complete(self, request: web.Request) -> web.Response:
        upload = self._upload(request.match_info["id"])
        body = await self.sim._body(request)
        part_ids = body.get("part_ids")
        if not isinstance(part_ids, list) or not all(p in upload.parts for p in part_ids):
            raise w.BadRequest("part_ids must name this upload's parts, in order")
        if upload.status == "completed" and upload.file is not None:
            return web.json_response(upload.as_json())
        target = self.sim.world.objects_dir / f"file-{secrets.token_hex(8)}"
        md5 = await asyncio.to_thread(_concatenate, [upload.parts[p] for p in part_ids], target)
        size = target.stat().st_size
        if size != upload.bytes:
            raise w.BadRequest(f"the parts hold {size} bytes, not the {upload.bytes} announced")
        if body.get("md5") and body["md5"] != md5:
            raise w.BadRequest("md5 does not match the parts")
        file = SimFile(self.world._id("file"), upload.filename, target, size, upload.purpose)
        self.world.files[file.id] = file
        upload.status, upload.file = "completed", file
        self.sim.journal.uploads += 1
        self.sim.journal.dataset_creates[file.filename] += 1
        return web.json_response(upload.as_json())

    def _upload(self, upload_id: str) -> SimUpload:
        try:
            return self.world.uploads[upload_id]
        except KeyError:
            raise w.Missing(f"No such Upload object: {upload_id}") from None

    # ---------------------------------------------------------------------- jobs

    async def create_job(self, request: web.Request) -> web.Response:
        body = await self.sim._body(request)
        fields = w._require_strings(body, "model", "training_file")
        file = self.world.files.get(fields["training_file"])
        if file is None:
            raise w.BadRequest(f"invalid training_file: {fields['training_file']}")
        validation = body.get("validation_file")
        if validation is not None and validation not in self.world.files:
            raise w.BadRequest(f"invalid validation_file: {validation}")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or len(metadata) > 16:
            raise w.BadRequest("metadata must be an object of at most 16 pairs")
        method = body.get("method") or {}
        hyper = body.get("hyperparameters") or (method.get(method.get("type", ""), {}) or {}).get(
            "hyperparameters", {}
        )
        seed = body.get("seed")
        job = SimJob(
            id=self.world._id("ftjob"),
            name=str(metadata.get("orchestrator_job") or ""),
            model=fields["model"],
            training_file=file.id,
            suffix=body.get("suffix"),
            seed=seed if isinstance(seed, int) else self.sim.world.rng.randrange(1 << 30),
            metadata={str(k): str(v) for k, v in metadata.items()},
            hyperparameters=hyper if isinstance(hyper, dict) else {},
        )
        job.name = job.name or job.id
        cfg = self.sim.config
        job.validated_at = time.monotonic() + cfg.validation_seconds
        job.will_fail = self.sim.world.rng.random() < cfg.training_failure_rate
        self.world.jobs[job.id] = job
        self.world.event(job, f"Created fine-tuning job: {job.id}")
        self.world.event(job, "Validating training file")
        self.sim.journal.finetune_creates[job.name] += 1
        job.validation_file = validation
        paths = [file.path] + ([self.world.files[validation].path] if validation else [])
        task = asyncio.create_task(self._check(job, paths))
        self.sim._background.add(task)
        task.add_done_callback(self.sim._background.discard)
        return web.json_response(self.world.as_json(job))

    async def _check(self, job: SimJob, paths: list[Path]) -> None:
        cfg = self.sim.config
        problem = None
        for prefix, path in zip(("", "validation file: "), paths, strict=False):
            found = await asyncio.to_thread(w.check_dataset_file, path, cfg.max_example_chars)
            if found and problem is None:
                problem = prefix + found
        if problem is None and self.sim.world.rng.random() < cfg.validation_failure_rate:
            problem = "provider rejected the dataset (injected validation failure)"
        job.records = 0 if problem else await asyncio.to_thread(w.count_examples, paths[0])
        job.problem, job.checked = problem, True

    async def list_jobs(self, request: web.Request) -> web.Response:
        wanted = {
            k[len("metadata[") : -1]: v
            for k, v in request.query.items()
            if k.startswith("metadata[") and k.endswith("]")
        }
        jobs = sorted(self.world.jobs.values(), key=lambda j: (j.created_at, j.id), reverse=True)
        jobs = [j for j in jobs if all(j.metadata.get(k) == v for k, v in wanted.items())]
        return web.json_response(_page(jobs, request, self.world.as_json))

    async def get_job(self, request: web.Request) -> web.Response:
        return web.json_response(self.world.as_json(self._job(request.match_info["id"])))

    async def cancel(self, request: web.Request) -> web.Response:
        job = self._job(request.match_info["id"])
        self.world.advance(job)
        if job.status in ("succeeded", "failed", "cancelled"):
            return error(400, f"Job has already {job.status}.", code="invalid_state")
        job.status, job.finished_at = "cancelled", int(time.time())
        self.world.event(job, "Fine-tuning job cancelled")
        self.sim.journal.cancels[job.id] += 1
        return web.json_response(self.world.as_json(job))

    async def events(self, request: web.Request) -> web.Response:
        job = self._job(request.match_info["id"])
        self.world.advance(job)
        return web.json_response(_page(list(reversed(job.events)), request, lambda e: e))

    def _job(self, job_id: str) -> SimJob:
        try:
            return self.world.jobs[job_id]
        except KeyError:
            raise w.Missing(f"No such fine-tuning job: {job_id}") from None


def _page(
    items: list[Any], request: web.Request, shown: Callable[[Any], dict[str, Any]]
) -> dict[str, Any]:
    """OpenAI's cursor pages: ``after`` an id, at most ``limit`` (20 by default)."""
    try:
        limit = max(1, min(int(request.query.get("limit", "20")), 100))
    except ValueError:
        raise w.BadRequest("limit must be an integer") from None
    after = request.query.get("after")
    if after:
        ids = [getattr(i, "id", None) or i.get("id") for i in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": [shown(i) for i in page], "has_more": len(items) > limit}


def _concatenate(parts: list[Path], target: Path) -> str:
    md5 = hashlib.md5()
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as source:
                while block := source.read(1024 * 1024):
                    md5.update(block)
                    out.write(block)
    return md5.hexdigest()
