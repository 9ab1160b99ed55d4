"""The simulator's HTTP server: the documented gateway API, an S3-like upload route,
fault injection, and ``/_sim/*`` routes for tests (journal, settings, preloading)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from aiohttp import web

from orchestrator.simulator import world as w
from orchestrator.simulator.config import ODD_ANSWERS, SimConfig
from orchestrator.simulator.jobs import FineTuningRoutes, is_openai_path
from orchestrator.simulator.jobs import error as openai_error
from orchestrator.simulator.signing import UrlSigner

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_ACCESS_LOG = logging.getLogger("orchestrator.simulator.access")
API_KEY_HEADER = "x-portkey-api-key"
ENDPOINT = web.RequestKey("endpoint", str)


def _envelope(data: Any, status: int = 200) -> web.Response:
    return web.json_response({"success": True, "data": data}, status=status)


def _failure(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"success": False, "error": {"message": message}}, status=status, headers=headers
    )


def _odd_response(kind: str) -> web.Response:
    """An answer given instead of handling the request."""
    if kind in ("html_200", "html_502"):
        page = "<html><head><title>Gateway</title></head><body>Please wait</body></html>"
        return web.Response(
            status=200 if kind == "html_200" else 502, text=page, content_type="text/html"
        )
    if kind == "success_false":
        return web.json_response({"success": False})
    if kind == "not_found":
        return _failure(404, "not found")
    return web.Response(status=200, body=b'{"success": true, "da', content_type="application/json")


def _spoiled(kind: str, response: web.Response) -> web.Response:
    """A handled request's answer, spoiled after the fact."""
    body = response.body if isinstance(response.body, bytes) else b""
    if kind == "cut_after":
        return web.Response(
            status=200, body=body[: len(body) // 2], content_type="application/json"
        )
    if kind == "no_data":
        return web.json_response({"success": True})
    data = json.loads(body).get("data")  # no_fields
    if isinstance(data, dict):
        data.pop("id", None)
        data.pop("status", None)
    return web.json_response({"success": True, "data": data})


def _s3_error(status: int, code: str, message: str) -> web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
    )
    return web.Response(status=status, text=body, content_type="application/xml")


class Simulator:
    """The gateway simulator. ``await start()`` binds a real socket; ``url`` says where."""

    def __init__(
        self,
        config: SimConfig | None = None,
        data_dir: Path | None = None,
        *,
        access_log: bool = False,
    ) -> None:
        self.config = config or SimConfig()
        self.access_log = access_log
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="finetune-sim-"))
        self.world = w.World(self.config, self.data_dir)
        self.jobs = FineTuningRoutes(self)  # the OpenAI-compatible dialect
        self._signer: UrlSigner | None = None
        self._runner: web.AppRunner | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._last_signed_url = ""
        self.url = ""

    @property
    def journal(self) -> w.Journal:
        return self.world.journal

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(middlewares=[self._faults], client_max_size=1024**2)
        r = app.router
        r.add_post("/v1/datasets", self._create_dataset)
        r.add_put("/v1/datasets/{id}", self._update_dataset)
        r.add_get("/v1/datasets/{id}", self._get_dataset)
        r.add_post("/v1/finetune", self._create_finetune)
        r.add_put("/v1/finetune/{id}", self._update_finetune)
        r.add_get("/v1/finetune/{id}", self._get_finetune)
        r.add_post("/v1/finetune/{id}/validation/start", self._start_validation)
        r.add_post("/v1/finetune/{id}/start", self._start)
        r.add_post("/v1/finetune/{id}/cancel", self._cancel)
        self.jobs.add(r)
        r.add_get("/_sim/journal", self._journal)
        r.add_get("/_sim/finetunes", self._finetunes)
        r.add_post("/_sim/config", self._set_config)
        r.add_put("/_sim/objects/{key:.+}", self._preload)
        r.add_put("/{bucket}/{key:.+}", self._upload)
        r.add_route("*", "/v1/{tail:.*}", self._unknown)
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=_ACCESS_LOG if self.access_log else None,
            access_log_format='%a "%r" %s %b %Tfs',
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        bound = server.sockets[0].getsockname()  # type: ignore[attr-defined]
        shown_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown_host}:{bound[1]}"
        self._signer = UrlSigner(secrets.token_bytes(32), self.url)
        return self.url

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._runner:
            await self._runner.cleanup()
            self._runner = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def preload(self, key: str, source: Path) -> None:
        """Put a file into the bucket as if it had been uploaded earlier (for ``s3_key`` jobs)."""
        target = self.world.objects_dir / hashlib.sha256(key.encode()).hexdigest()
        shutil.copyfile(source, target)
        with target.open("rb") as handle:
            md5 = hashlib.file_digest(handle, "md5").hexdigest()
        self.world.objects[key] = (target, md5, target.stat().st_size)

    # -------------------------------------------------------------------- faults

    @web.middleware
    async def _faults(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith("/_sim/"):
            return await handler(request)
        cfg, rng = self.config, self.world.rng
        if not path.startswith("/v1/"):  # the storage host
            if cfg.storage_latency:
                await asyncio.sleep(cfg.storage_latency)
            if cfg.storage_error_rate and rng.random() < cfg.storage_error_rate:
                self.journal.faults["storage_5xx"] += 1
                return _s3_error(503, "SlowDown", "Please reduce your request rate.")
            return await handler(request)
        if cfg.latency or cfg.latency_jitter:
            await asyncio.sleep(cfg.latency + rng.random() * cfg.latency_jitter)
        openai = is_openai_path(path)
        fail = openai_error if openai else _failure  # each dialect's error shape
        bearer = request.headers.get("Authorization", "")
        if request.headers.get(API_KEY_HEADER) != cfg.api_key and bearer != f"Bearer {cfg.api_key}":
            return fail(401, "invalid or missing x-portkey-api-key (or bearer token)")
        if cfg.drop_rate and rng.random() < cfg.drop_rate:
            self.journal.faults["dropped"] += 1
            return self._drop(request)
        if cfg.rate_limit_rate and rng.random() < cfg.rate_limit_rate:
            self.journal.faults["429"] += 1
            return fail(429, "rate limit exceeded", headers={"Retry-After": f"{cfg.retry_after:g}"})
        if cfg.error_rate and rng.random() < cfg.error_rate:
            status = rng.choice((500, 502, 503))
            self.journal.faults[str(status)] += 1
            return fail(status, "injected server error")
        # Odd answers are the envelope's (HTML pages, cut or hollow envelopes).
        odd = self._odd_answer(request) if cfg.odd_answer_rate and not openai else None
        if odd is not None and ODD_ANSWERS[odd] != "after":
            return _odd_response(odd)
        response = await handler(request)
        name = request.get(ENDPOINT, "unknown")
        self.journal.statuses[f"{name} {response.status}"] += 1
        if cfg.lost_response_rate and rng.random() < cfg.lost_response_rate:
            self.journal.faults["lost_response"] += 1
            return self._drop(request)
        if odd is not None and isinstance(response, web.Response) and response.status < 300:
            return _spoiled(odd, response)
        return response

    def _odd_answer(self, request: web.Request) -> str | None:
        """The kind of odd answer this request gets, if any (counted in the journal)."""
        cfg, rng = self.config, self.world.rng
        if rng.random() >= cfg.odd_answer_rate:
            return None
        kinds = [k.strip() for k in cfg.odd_answer_kinds.split(",") if k.strip()] or list(
            ODD_ANSWERS
        )
        if request.method != "GET":
            kinds = [k for k in kinds if ODD_ANSWERS[k] != "get"]
        if not kinds:
            return None
        kind = rng.choice(kinds)
        self.journal.faults[f"odd_{kind}"] += 1
        return kind

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        # Nothing reaches the client: the transport is gone before this is written.
        return web.Response(status=499)

    # ---------------------------------------------------------------- gateway API

    def _count(self, name: str) -> None:
        self.journal.requests[name] += 1

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise w.BadRequest("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise w.BadRequest("request body must be a JSON object")
        return body

    async def _guarded(
        self, name: str, request: web.Request, action: Callable[[], Awaitable[web.Response]]
    ) -> web.Response:
        self._count(name)
        request[ENDPOINT] = name
        try:
            return await action()
        except w.BadRequest as exc:
            message = str(exc)
            if self.config.echo_secrets:
                key = request.headers.get(API_KEY_HEADER, "")
                message += f" (request key {key}; last upload URL {self._last_signed_url})"
            return _failure(400, message)
        except w.Missing as exc:
            return _failure(404, str(exc))
        except w.Conflict as exc:
            return _failure(409, str(exc))

    async def _create_dataset(self, request: web.Request) -> web.Response:
        async def act() -> web.Response:
            dataset, _ = self.world.create_dataset(
                await self._body(request), request.headers.get("Idempotency-Key")
            )
            assert self._signer is not None
            url = self._signer.sign(self.config.bucket, dataset.key, self.config.url_ttl)
            self._last_signed_url = url
            return _envelope({"id": dataset.id, "signed_url": url})

        return await self._guarded("create_dataset", request, act)

    async def _update_dataset(self, request: web.Request) -> web.Response:
        async def act() -> web.Response:
            self.world.update_dataset(request.match_info["id"], await self._body(request))
            return _envelope({})

        return await self._guarded("update_dataset", request, act)

    async def _get_dataset(self, request: web.Request) -> web.Response:
        async def act() -> web.Response:
            return _envelope(self.world._dataset(request.match_info["id"]).as_json())

        return await self._guarded("get_dataset", request, act)

    async def _create_finetune(self, request: web.Request) -> web.Response:
        async def act() -> web.Response:
            finetune, _ = self.world.create_finetune(
                await self._body(request), request.headers.get("Idempotency-Key")
            )
            return _envelope({"id": finetune.id})

        return await self._guarded("create_finetune", request, act)

    async def _update_finetune(self, request: web.Request) -> web.Response:
        async def act() -> web.Response:
            self.world.attach_dataset(request.match_info["id"], await self._body(request))
            return _envelope({})

        return await self._guarded("update_finetune", request, act)

    async def _get_finetune(self, request: web.Request) -> web.Response:
        async def act() -> web.Response:
            finetune = self.world.finetune(request.match_info["id"])
            return _envelope(self.world.finetune_json(finetune))

        return await self._guarded("get_finetune", request, act)

    async def _start_validation(self, request: web.Request) -> web.Response:
        async def act() -> web.Response:
            begun = self.world.start_validation(request.match_info["id"])
            finetune, path = begun if begun is not None else (None, None)
            if finetune is not None and path is not None:
                task = asyncio.create_task(self._validate(finetune, path))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return _envelope({})

        return await self._guarded("start_validation", request, act)

    async def _validate(self, finetune: w.SimFinetune, path: Path) -> None:
        problem = await asyncio.to_thread(w.check_dataset_file, path, self.config.max_example_chars)
        records = None if problem else await asyncio.to_thread(w.count_examples, path)
        self.world.finish_validation(finetune, problem, records)

    async def _start(self, request: web.Request) -> web.Response:
        async def act() -> web.Response:
            self.world.start(request.match_info["id"], await self._body(request))
            return _envelope({})

        return await self._guarded("start_finetune", request, act)

    async def _cancel(self, request: web.Request) -> web.Response:
        async def act() -> web.Response:
            self.world.cancel(request.match_info["id"])
            return _envelope({})

        return await self._guarded("cancel_finetune", request, act)

    async def _unknown(self, request: web.Request) -> web.Response:
        return _failure(404, f"no route {request.method} {request.path}")

    # ------------------------------------------------------------------- storage

    async def _upload(self, request: web.Request) -> web.Response:
        journal = self.journal
        if API_KEY_HEADER in request.headers:
            journal.storage_api_key_leaks += 1
        unsigned = [h for h in request.headers if h.lower().startswith("x-amz-")]
        journal.storage_unsigned_amz_headers += len(unsigned)
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            journal.storage_chunked += 1
            return _s3_error(
                411, "MissingContentLength", "You must provide the Content-Length HTTP header."
            )
        if request.content_length is None:
            return _s3_error(
                411, "MissingContentLength", "You must provide the Content-Length HTTP header."
            )
        assert self._signer is not None
        raw_path = request.raw_path.split("?", 1)[0]
        problem = self._signer.verify(
            "PUT", raw_path, request.host, dict(request.query), time.time()
        )
        if problem:
            return _s3_error(403, *problem)
        if request.content_length > self.config.max_object_bytes:
            return _s3_error(
                400, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size"
            )
        bucket, key = request.match_info["bucket"], request.match_info["key"]
        if bucket != self.config.bucket:
            return _s3_error(404, "NoSuchBucket", "The specified bucket does not exist")
        target = self.world.objects_dir / hashlib.sha256(key.encode()).hexdigest()
        partial = target.with_suffix(f".part-{secrets.token_hex(4)}")
        md5 = hashlib.md5()
        received = 0
        try:
            with partial.open("wb") as out:
                async for block in request.content.iter_chunked(1024 * 1024):
                    md5.update(block)
                    out.write(block)
                    received += len(block)
            if received != request.content_length:
                return _s3_error(
                    400,
                    "IncompleteBody",
                    "You did not provide the number of bytes the Content-Length header named",
                )
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        digest = md5.hexdigest()
        self.world.objects[key] = (target, digest, received)
        journal.uploads += 1
        journal.upload_bytes += received
        return web.Response(status=200, headers={"ETag": f'"{digest}"'})

    # ------------------------------------------------------------ test-only routes

    async def _journal(self, request: web.Request) -> web.Response:
        return web.json_response(self.journal.as_json())

    async def _finetunes(self, request: web.Request) -> web.Response:
        out = [self.world.finetune_json(self.world.finetune(i)) for i in list(self.world.finetunes)]
        return web.json_response(out)

    async def _set_config(self, request: web.Request) -> web.Response:
        try:
            self.config.update(await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.config.public())

    async def _preload(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        tmp = self.data_dir / f"preload-{secrets.token_hex(4)}"
        tmp.write_bytes(await request.read())
        self.preload(key, tmp)
        tmp.unlink()
        return web.json_response({"key": key})


class _Unsigned(logging.Formatter):
    """Access log lines without the signatures in upload URLs' query strings."""

    def format(self, record: logging.LogRecord) -> str:
        return _QUERY.sub("?<redacted>", super().format(record))


_QUERY = re.compile(r"\?[^\s\"]*")


class SimulatorThread:
    """The simulator on its own event loop in a background thread (tests, demo, bench)."""

    def __init__(self, config: SimConfig | None = None, data_dir: Path | None = None) -> None:
        self.simulator = Simulator(config, data_dir)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return self.simulator.url

    @property
    def journal(self) -> w.Journal:
        return self.simulator.journal

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(
            self.simulator.start(host, port), self._loop
        ).result(timeout=30)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.simulator.stop(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the simulator's loop (to read or change its state safely)."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)


@contextmanager
def running_simulator(config: SimConfig | None = None) -> Iterator[SimulatorThread]:
    sim = SimulatorThread(config)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


async def serve_forever(
    config: SimConfig,
    host: str,
    port: int,
    data_dir: Path | None,
    preload: Sequence[tuple[str, Path]] = (),
    access_log: bool = False,
) -> None:
    """Run until SIGINT or SIGTERM; prints where it listens as the first line. On the way
    out a temporary data folder is removed: uploads leave gigabytes in it."""
    simulator = Simulator(config, data_dir, access_log=access_log)
    for key, path in preload:
        simulator.preload(key, path)
    url = await simulator.start(host, port)
    if access_log:  # one line per request on stdout; query strings hold signatures
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(_Unsigned("%(message)s"))
        _ACCESS_LOG.addHandler(handler)
        _ACCESS_LOG.setLevel(logging.INFO)
        _ACCESS_LOG.propagate = False
    print(f"simulator listening on {url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await simulator.stop()
