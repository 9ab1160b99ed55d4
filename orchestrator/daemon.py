"""The long-running service: watch a folder of manifests, drive their jobs with the same
engine as ``run``, serve ``/healthz``, ``/metrics`` and ``/jobs``, and stop cleanly.

Editing a manifest admits its new (or retried) jobs; jobs already being driven carry on.
Removing a manifest does not cancel its jobs: those already admitted are followed to
their end, and nothing new starts from that file. ``orchestrator cancel`` against the
same state file cancels jobs while the daemon runs (the store is the control plane).

It is built to run for weeks: a finished job leaves nothing in memory, every file
system access (listing, stat, reading and parsing manifests) runs in a worker thread,
and one manifest's trouble (a parse error, a file deleted while read) is reported on
that manifest and never stops the watching.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any

import anyio
import anyio.to_thread
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from orchestrator.engine import Engine, RunSummary
from orchestrator.errors import GatewayUnreachable, InputError
from orchestrator.logs import Redactor
from orchestrator.manifest import Manifest, load_manifest
from orchestrator.metrics import Metrics
from orchestrator.plan import inspect_datasets, plan_jobs
from orchestrator.runner import Gateway, Notifications, gateway_of, open_engine
from orchestrator.settings import EngineSettings
from orchestrator.states import iso_time
from orchestrator.store import CheckpointStore

log = structlog.get_logger("daemon")
MANIFEST_SUFFIXES = (".yaml", ".yml")


@dataclass
class ManifestFile:
    path: Path
    signature: tuple[int, int] = (0, 0)  # (mtime_ns, size) when last loaded
    error: str | None = None
    jobs: tuple[str, ...] = ()
    gateway: Gateway | None = None


@dataclass
class Daemon:
    watch_dir: Path
    store: CheckpointStore
    settings: EngineSettings
    metrics: Metrics
    listen: tuple[str, int] = ("127.0.0.1", 9464)
    rescan_interval: float = 30.0
    force_polling: bool = False
    redactor: Redactor | None = None
    notify: Notifications = field(default_factory=Notifications)
    auth_token: str | None = None  # required of every request but /healthz when set
    manifests: dict[Path, ManifestFile] = field(default_factory=dict)
    engines: dict[Gateway, Engine] = field(default_factory=dict)
    stopping: bool = False
    heartbeat: float = field(default_factory=time.monotonic)
    url: str = ""
    _tg: anyio.abc.TaskGroup | None = None
    _engine_groups: dict[Gateway, anyio.abc.TaskGroup] = field(default_factory=dict)
    _engine_scopes: dict[Gateway, anyio.CancelScope] = field(default_factory=dict)
    exit_code: int = 0
    _reload_lock: anyio.Lock = field(default_factory=anyio.Lock)

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        """Until SIGTERM/SIGINT; then stop new steps, wait a bounded time, return."""
        async with AsyncExitStack() as stack:
            runner = await self._start_http()
            stack.push_async_callback(runner.cleanup)
            notifier = await stack.enter_async_context(self.notify.notifier(self.store))
            async with anyio.create_task_group() as tg:
                self._tg = tg
                if notifier is not None:
                    tg.start_soon(notifier.serve)
                tg.start_soon(self._heartbeat)
                tg.start_soon(self._watch)
                tg.start_soon(self._watch_engines, tg.cancel_scope)
                await self._rescan()
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                    async for signum in received:
                        log.info("shutting down", signal=signal.Signals(signum).name)
                        break
                    # A second signal cuts the grace period short; a third is harmless.
                    tg.start_soon(self._second_signal, received, tg.cancel_scope)
                    await self._shutdown(tg)

    async def _second_signal(self, received: AsyncIterator[int], scope: anyio.CancelScope) -> None:
        async for _ in received:
            log.warning("second signal; leaving steps in flight to the next start")
            scope.cancel()

    async def _shutdown(self, tg: anyio.abc.TaskGroup) -> None:
        self.stopping = True
        engines = list(self.engines.values())  # the engine watcher may retire one meanwhile
        for engine in engines:
            engine.stop()
        with anyio.move_on_after(self.settings.shutdown_grace):
            for engine in engines:
                await engine.wait_idle()
        left = sum(engine.active for engine in engines)
        if left:
            log.warning("grace period over; leaving steps to the next start", jobs=left)
        tg.cancel_scope.cancel()

    async def _watch_engines(self, scope: anyio.CancelScope) -> None:
        """An engine whose store failed ends the daemon (exit 1: nothing more can be
        recorded); one whose gateway refused the key is retired, and its manifests
        show the error until they are edited."""
        while True:
            await anyio.sleep(1.0)
            for gateway, engine in list(self.engines.items()):
                if engine.broken:
                    log.error("state store failed; stopping", error=engine.broken)
                    self.exit_code = 1
                    scope.cancel()
                    return
                if engine.fatal:
                    self.engines.pop(gateway)
                    self._engine_scopes.pop(gateway).cancel()
                    for entry in self.manifests.values():
                        if entry.gateway == gateway:
                            self._manifest_error(entry, engine.fatal)

    async def _heartbeat(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            await anyio.sleep(1.0)

    # ------------------------------------------------------------------ watching

    async def _watch(self) -> None:
        """File events trigger a rescan; a periodic rescan covers what events miss."""
        import watchfiles

        async def periodic() -> None:
            while True:
                await anyio.sleep(self.rescan_interval)
                await self._rescan()

        async with anyio.create_task_group() as tg:
            tg.start_soon(periodic)
            try:
                async for _ in watchfiles.awatch(
                    self.watch_dir,
                    debounce=200,
                    step=50,
                    recursive=False,
                    force_polling=self.force_polling or None,
                ):
                    await self._rescan()
            except (OSError, RuntimeError) as exc:  # no inotify here: polling alone
                log.warning(
                    "file watching unavailable; polling",
                    error=str(exc),
                    interval=self.rescan_interval,
                )
                await anyio.sleep_forever()

    async def _rescan(self) -> None:
        async with self._reload_lock:
            if self.stopping:
                return
            try:
                present = await anyio.to_thread.run_sync(_list_manifests, self.watch_dir)
            except OSError as exc:
                log.error(
                    "cannot list the manifest folder", folder=str(self.watch_dir), error=str(exc)
                )
                return
            for path, signature in sorted(present.items()):
                entry = self.manifests.setdefault(path, ManifestFile(path))
                if entry.signature != signature:
                    entry.signature = signature
                    await self._load(entry)
            for path in set(self.manifests) - set(present):
                entry = self.manifests.pop(path)
                log.info(
                    "manifest removed; its jobs are not cancelled",
                    manifest=str(path),
                    jobs=len(entry.jobs),
                )
            self.metrics.manifest_errors = sum(1 for m in self.manifests.values() if m.error)

    async def _load(self, entry: ManifestFile) -> None:
        """Admit a manifest's jobs; any problem is that manifest's error, logged and
        shown, never the daemon's. A gateway that did not answer is tried again at the
        next rescan."""
        try:
            await self._admit(entry)
        except (InputError, OSError) as exc:
            self._manifest_error(entry, str(exc))
            if isinstance(exc, GatewayUnreachable):
                entry.signature = (0, 0)
        except Exception as exc:
            log.exception("internal error", manifest=str(entry.path))
            self._manifest_error(entry, f"internal error: {type(exc).__name__}: {exc}")

    def _manifest_error(self, entry: ManifestFile, error: str) -> None:
        entry.error = self.redactor.text(error) if self.redactor else error
        log.error("manifest skipped", manifest=str(entry.path), error=entry.error)

    async def _admit(self, entry: ManifestFile) -> None:
        manifest = self.notify.apply(await anyio.to_thread.run_sync(load_manifest, entry.path))
        gateway = gateway_of(manifest)
        if self.redactor is not None:
            self.redactor.add_secret(manifest.api_key)
            for _, value in manifest.headers:
                self.redactor.add_secret(value)
        engine = await self._engine_for(manifest, gateway)
        entry.error, entry.gateway = None, gateway
        entry.jobs = tuple(job.name for job in manifest.jobs)
        reports = await inspect_datasets(manifest.jobs, self.settings.check)
        # Jobs some engine drives already carry on (a manifest whose gateway changed
        # gets a new engine; the old one keeps its jobs): one driver per job.
        engines = list(self.engines.values())
        specs = [j for j in manifest.jobs if not any(e.is_driving(j.name) for e in engines)]
        records = await self.store.load([job.name for job in specs])
        planned = await anyio.to_thread.run_sync(plan_jobs, specs, reports, records)
        runs = await engine.admit(planned, RunSummary())
        await engine.start(self._engine_groups[gateway], runs)
        log.info(
            "manifest loaded", manifest=str(entry.path), jobs=len(manifest.jobs), driving=len(runs)
        )

    async def _engine_for(self, manifest: Manifest, gateway: Gateway) -> Engine:
        """One engine per gateway (URL and key), living until the daemon stops."""
        if gateway not in self.engines:
            assert self._tg is not None
            await self._tg.start(self._host_engine, manifest, gateway)
        return self.engines[gateway]

    async def _host_engine(
        self,
        manifest: Manifest,
        gateway: Gateway,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        async with (
            open_engine(
                gateway,
                manifest.statuses,
                self.store,
                self.settings,
                self.metrics,
                apis=[job.api for job in manifest.jobs],
                keep_finished=False,
                redactor=self.redactor,
            ) as engine,
            anyio.create_task_group() as group,
        ):
            engine.lc.clock.estimates.update(await self.store.load_estimates())
            self.engines[gateway] = engine
            self._engine_groups[gateway] = group
            self._engine_scopes[gateway] = group.cancel_scope
            group.start_soon(engine.serve)
            task_status.started()
            await anyio.sleep_forever()

    # ---------------------------------------------------------------------- HTTP

    async def _start_http(self) -> web.AppRunner:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/", self._page)
        app.router.add_get("/login", self._login_form)
        app.router.add_post("/login", self._login)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/jobs", self._jobs)
        app.router.add_get("/jobs/{name}", self._job)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, *self.listen)
        await site.start()
        sockets = site._server.sockets  # type: ignore[union-attr]
        host, port = sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        print(f"daemon listening on {self.url}", flush=True)
        log.info("http endpoint listening", url=self.url, watch=str(self.watch_dir))
        return runner

    async def _healthz(self, request: web.Request) -> web.Response:
        loop_alive = time.monotonic() - self.heartbeat < 5.0
        writable = await self.store.healthy()
        ok = loop_alive and writable and not self.stopping
        body = {
            "ok": ok,
            "loop_alive": loop_alive,
            "store_writable": writable,
            "stopping": self.stopping,
        }
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics.set_job_counts(await self.store.count_by_state())
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    # What leaves over HTTP passes through the same redaction as the logs.
    def _json(self, data: Any) -> web.Response:
        text = json.dumps(data, indent=2)
        if self.redactor is not None:
            text = self.redactor.text(text)
        return web.Response(text=text, content_type="application/json")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """With a token, everything but ``/healthz`` and ``/login`` needs it: as a bearer
        token, or as the cookie a login with it set."""
        token = self.auth_token
        if token is None and not is_loopback(request.url.host or ""):
            # Open on loopback only to loopback names: a page elsewhere that points its
            # own host name at 127.0.0.1 (DNS rebinding) must not read the jobs.
            return web.json_response({"error": "unexpected Host"}, status=403)
        if token is None or request.path in ("/healthz", "/login"):
            response: web.StreamResponse = await handler(request)
            return response
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        given = given or request.cookies.get(AUTH_COOKIE, "")
        if given and hmac.compare_digest(given.encode(), token.encode()):
            response = await handler(request)
            return response
        if request.path == "/":
            return web.Response(status=401, text=_LOGIN_PAGE, content_type="text/html")
        return web.json_response({"error": "a bearer token is required"}, status=401)

    async def _login_form(self, request: web.Request) -> web.Response:
        return web.Response(text=_LOGIN_PAGE, content_type="text/html")

    async def _login(self, request: web.Request) -> web.Response:
        token = str((await request.post()).get("token", ""))
        if self.auth_token is None or not hmac.compare_digest(
            token.encode(), self.auth_token.encode()
        ):
            return web.Response(status=401, text=_LOGIN_PAGE, content_type="text/html")
        response = web.HTTPSeeOther("/")
        response.set_cookie(AUTH_COOKIE, token, httponly=True, samesite="Strict", path="/")
        return response

    async def _page(self, request: web.Request) -> web.Response:
        page = await anyio.Path(STATUS_PAGE).read_text()
        return web.Response(text=page, content_type="text/html")

    async def _job(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        record = (await self.store.load([name])).get(name)
        if record is None:
            return web.json_response({"error": f"no such job: {name}"}, status=404)
        history = [
            {
                "at": iso_time(t.at),
                "old": t.old.value if t.old else None,
                "new": t.new.value,
                "detail": t.detail,
            }
            for t in await self.store.history(name)
        ]
        progress = self.metrics.uploads.get(name)
        upload = (
            {"sent": progress.sent, "total": progress.total, "rate": round(progress.rate)}
            if progress
            else None
        )
        return self._json({"record": record.public(), "history": history, "upload": upload})

    async def _jobs(self, request: web.Request) -> web.Response:
        records, leases = await self.store.load(), await self.store.leases()
        out: list[dict[str, Any]] = [
            {**records[n].public(), **(leases[n].public() if n in leases else {})}
            for n in sorted(records)
        ]
        for entry in self.manifests.values():
            if entry.error:
                out.append(
                    {
                        "name": entry.path.name,
                        "state": "manifest_error",
                        "manifest": str(entry.path),
                        "error": entry.error,
                    }
                )
        return self._json(out)


AUTH_COOKIE = "orchestrator_token"
STATUS_PAGE = Path(__file__).parent / "static" / "status.html"
_LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Sign in</title>
<style>body{font:15px system-ui,sans-serif;max-width:360px;margin:15vh auto;padding:0 16px}
input,button{font:inherit;padding:8px;width:100%;margin-top:8px}</style></head><body>
<h1>Fine-tune orchestrator</h1><form method="post" action="/login">
<label>Token <input name="token" type="password" autocomplete="current-password"></label>
<button type="submit">Sign in</button></form></body></html>"""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _list_manifests(folder: Path) -> dict[Path, tuple[int, int]]:
    """Each manifest file in ``folder`` with its (mtime_ns, size); a file that vanishes
    while it is looked at is simply not there."""
    found: dict[Path, tuple[int, int]] = {}
    if not folder.is_dir():
        return found
    for path in folder.iterdir():
        if path.suffix not in MANIFEST_SUFFIXES:
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if S_ISREG(stat.st_mode):
            found[path] = (stat.st_mtime_ns, stat.st_size)
    return found


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets), the port 0-65535 (0: any free port)."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InputError(
            f"--listen {value}: expected HOST:PORT with a port from 0 to 65535, "
            "for example 127.0.0.1:9464"
        )
    return host, int(port)
