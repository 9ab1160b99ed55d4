"""The HTTP contract with the fine-tuning gateway: endpoints, bodies, envelope, errors.

Everything that knows a path, a header name or a field of the gateway's JSON lives
here. One method per documented call. Each endpoint says whether it may be retried
blindly: reads and PUTs may; the two creates only when an ``Idempotency-Key`` is sent;
``/start`` never (the lifecycle observes the finetune instead, see ``lifecycle``).

Bytes move through a ``sessions.HttpSession``; what an answer means is decided here:
an answer we cannot read is ``UnreadableAnswer``, never data and never a refusal.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import anyio
import orjson
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from orchestrator.errors import (
    GatewayError,
    PermanentError,
    RetryableError,
    UnreadableAnswer,
    permanent_for_status,
    retryable_status,
)
from orchestrator.retry import call_with_retries, parse_retry_after
from orchestrator.sessions import Body, NoAnswer, Reply, open_session
from orchestrator.settings import ClientSettings

API_KEY_HEADER = "x-portkey-api-key"
IDEMPOTENCY_HEADER = "Idempotency-Key"


# --------------------------------------------------------------------------- models


class GatewayModel(BaseModel):
    """Accepts camelCase and snake_case, keeps fields we do not know yet. Validators are
    built when first used, not at import: ``status`` and ``plan`` use none."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="allow",
        defer_build=True,
    )


class CreatedDataset(GatewayModel):
    id: str
    signed_url: str


class Dataset(GatewayModel):
    id: str
    name: str | None = None
    s3_path: str | None = None
    status: str | None = None
    type: str | None = None


class CreatedFinetune(GatewayModel):
    id: str


class Finetune(GatewayModel):
    id: str
    name: str | None = None
    status: str | None = None
    slug: str | None = None
    training_dataset_id: str | None = None
    validation_dataset_id: str | None = None
    hyperparameters: dict[str, Any] | None = None
    provider_finetune_id: str | None = None
    created_at: str | None = None
    last_updated_at: str | None = None
    metadata: dict[str, Any] | None = None
    training_dataset: Dataset | None = None
    error: Any = None  # a string, or an object with message, code and param

    def failure_message(self) -> str | None:
        """The gateway's words on why validation or training failed, wherever it put them."""
        extra = self.model_extra or {}
        for candidate in (
            self.error,
            extra.get("errorMessage"),
            extra.get("statusMessage"),
            extra.get("message"),
            (self.metadata or {}).get("error"),
        ):
            message = error_text(candidate)
            if message:
                return message
        return None

    def usage(self) -> dict[str, Any] | None:
        """What the gateway reported of the training's size, where it said anything."""
        metadata, extra = self.metadata or {}, self.model_extra or {}
        found = {
            "records": metadata.get("trainingRecords"),
            "units": metadata.get("trainingUnits"),
            "tokens": metadata.get("trainedTokens") or extra.get("trainedTokens"),
        }
        found = {k: v for k, v in found.items() if isinstance(v, int | float)}
        return found or None


def error_text(error: Any) -> str | None:
    """A gateway error as one line: a string as it is, an object as its message with
    its code and param when it has them."""
    if isinstance(error, str):
        return error or None
    if not isinstance(error, dict):
        return None
    message = error_text(error.get("message")) or error_text(error.get("error"))
    details = [f"{key} {error[key]}" for key in ("code", "param") if error.get(key)]
    if message and details:
        return f"{message} ({', '.join(details)})"
    return message or (", ".join(details) or None)


# ------------------------------------------------------------------------ endpoints

M = TypeVar("M", bound=GatewayModel)


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str
    retry_blindly: bool  # safe to repeat after a lost response without observing first


CREATE_DATASET = Endpoint("create_dataset", "POST", "/v1/datasets", retry_blindly=False)
UPDATE_DATASET = Endpoint("update_dataset", "PUT", "/v1/datasets/{id}", retry_blindly=True)
GET_DATASET = Endpoint("get_dataset", "GET", "/v1/datasets/{id}", retry_blindly=True)
CREATE_FINETUNE = Endpoint("create_finetune", "POST", "/v1/finetune", retry_blindly=False)
UPDATE_FINETUNE = Endpoint("update_finetune", "PUT", "/v1/finetune/{id}", retry_blindly=True)
START_VALIDATION = Endpoint(
    "start_validation", "POST", "/v1/finetune/{id}/validation/start", retry_blindly=True
)
START_FINETUNE = Endpoint("start_finetune", "POST", "/v1/finetune/{id}/start", retry_blindly=False)
CANCEL_FINETUNE = Endpoint(
    "cancel_finetune", "POST", "/v1/finetune/{id}/cancel", retry_blindly=True
)
GET_FINETUNE = Endpoint("get_finetune", "GET", "/v1/finetune/{id}", retry_blindly=True)


class CallObserver(Protocol):
    """Told about every HTTP attempt, for metrics. ``status`` is None on a transport error."""

    def gateway_call(self, endpoint: str, status: int | None, seconds: float) -> None: ...

    def gateway_retry(self, endpoint: str) -> None: ...


class RateLimiter:
    """At most ``rate`` acquisitions per second, spaced evenly (no bursts)."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0
        self._lock = anyio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = time.monotonic()
            wait = self._next - now
            self._next = max(now, self._next) + self._interval
        if wait > 0:
            await anyio.sleep(wait)


def scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


# --------------------------------------------------------------------------- client


class GatewayClient:
    """Async client for the fine-tuning gateway. Use as an async context manager."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        settings: ClientSettings | None = None,
        *,
        observer: CallObserver | None = None,
        rng: random.Random | None = None,
        auth: str = "portkey",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings or ClientSettings()
        self.auth = auth
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._observer = observer
        self._rng = rng or random.Random()
        self._limiter = (
            RateLimiter(self.settings.requests_per_second)
            if self.settings.requests_per_second
            else None
        )
        # Waiting for a slot here has no deadline; waiting in a pool would time out.
        self._slots = anyio.Semaphore(self.settings.max_connections, fast_acquire=True)
        # The key as the deployment takes it; a manifest's extra headers ride along.
        key = (
            {API_KEY_HEADER: api_key}
            if auth == "portkey"
            else {"Authorization": f"Bearer {api_key}"}
        )
        self._http = open_session(self.settings, self.base_url, {**(headers or {}), **key})

    @property
    def identity(self) -> str:
        """The base URL without any user or password in it: what is stored and shown."""
        parts = urlsplit(self.base_url)
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=host))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------- documented calls

    async def create_dataset(
        self, name: str, provider: str, model: str, *, idempotency_key: str | None = None
    ) -> CreatedDataset:
        body = {"name": name, "provider": provider, "model": model, "type": "training"}
        data = await self._call(CREATE_DATASET, json=body, idempotency_key=idempotency_key)
        return self._parse(CREATE_DATASET, CreatedDataset, data)

    async def update_dataset(self, dataset_id: str, s3_path: str) -> None:
        await self._call(UPDATE_DATASET, dataset_id, json={"s3_path": s3_path})

    async def get_dataset(self, dataset_id: str) -> Dataset:
        return self._parse(GET_DATASET, Dataset, await self._call(GET_DATASET, dataset_id))

    async def create_finetune(
        self,
        name: str,
        virtual_key: str,
        provider: str,
        model: str,
        hyperparameters: dict[str, Any],
        *,
        idempotency_key: str | None = None,
    ) -> CreatedFinetune:
        body = {
            "name": name,
            "virtual_key": virtual_key,
            "provider": provider,
            "model": model,
            "hyperparameters": hyperparameters,
        }
        data = await self._call(CREATE_FINETUNE, json=body, idempotency_key=idempotency_key)
        return self._parse(CREATE_FINETUNE, CreatedFinetune, data)

    async def update_finetune(self, finetune_id: str, training_dataset_id: str) -> None:
        await self._call(
            UPDATE_FINETUNE, finetune_id, json={"training_dataset_id": training_dataset_id}
        )

    async def start_validation(self, finetune_id: str) -> None:
        await self._call(START_VALIDATION, finetune_id)

    async def start_finetune(self, finetune_id: str, override_model: str | None = None) -> None:
        """Not retried: a lost response must be resolved by observing the finetune."""
        body = {"override_model": override_model} if override_model else None
        await self._call(START_FINETUNE, finetune_id, json=body)

    async def cancel_finetune(self, finetune_id: str) -> None:
        await self._call(CANCEL_FINETUNE, finetune_id)

    async def get_finetune(self, finetune_id: str) -> Finetune:
        """The finetune as the gateway states it. An answer without its ``id`` or a
        ``status`` is no statement: ``UnreadableAnswer``."""
        finetune = self._parse(GET_FINETUNE, Finetune, await self._call(GET_FINETUNE, finetune_id))
        if finetune.id != finetune_id:
            raise UnreadableAnswer(GET_FINETUNE.name, f"answer is about {finetune.id!r}")
        if not isinstance(finetune.status, str) or not finetune.status:
            raise UnreadableAnswer(GET_FINETUNE.name, "answer has no status")
        return finetune

    async def probe(self, attempts: int = 3) -> None:
        """GET a made-up finetune: proves the URL answers like the gateway and takes the key.

        Raises ``AuthError`` for a refused key, ``RetryableError`` when no HTTP answer came
        back at all, and ``PermanentError`` when the answer is not the gateway's envelope.
        """
        path = GET_FINETUNE.path.format(id="orchestrator-preflight-probe")
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            try:
                reply = await self._http.send("GET", path)
            except NoAnswer as exc:
                if last:
                    raise RetryableError(GET_FINETUNE.name, self._describe(exc)) from None
                await anyio.sleep(0.2 * attempt)
                continue
            if retryable_status(reply.status):
                return  # busy, but there
            if reply.status in (401, 403):
                self._unwrap(GET_FINETUNE, reply)
            envelope = _json(reply.body)
            if isinstance(envelope, dict) and "success" in envelope:
                return
            if last:  # one odd page may be a proxy's hiccup; every answer odd is a verdict
                raise PermanentError(
                    GET_FINETUNE.name,
                    f"{self.base_url} answered HTTP {reply.status} without the gateway's "
                    "{success, data} envelope; is the base URL right?",
                    reply.status,
                )
            await anyio.sleep(0.2 * attempt)

    # ---------------------------------------------------------------- the machinery

    async def _call(
        self,
        endpoint: Endpoint,
        object_id: str | None = None,
        *,
        json: dict[str, Any] | None = None,
        body: Body = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        path = endpoint.path.format(id=_path_segment(object_id)) if object_id else endpoint.path
        if query:
            path += "?" + urlencode(query)
        headers = dict(headers or {})
        if idempotency_key:
            headers[IDEMPOTENCY_HEADER] = idempotency_key
        if json is not None:
            body = orjson.dumps(json)
            headers["Content-Type"] = "application/json"
        if not (endpoint.retry_blindly or idempotency_key is not None):
            return await self._attempt(endpoint, path, body, headers, object_id is not None)
        return await call_with_retries(
            self.settings.retry,
            lambda: self._attempt(endpoint, path, body, headers, object_id is not None),
            rng=self._rng,
            on_retry=lambda: self._note_retry(endpoint),
        )

    def _note_retry(self, endpoint: Endpoint) -> None:
        if self._observer:
            self._observer.gateway_retry(endpoint.name)

    async def _attempt(
        self,
        endpoint: Endpoint,
        path: str,
        body: Body,
        headers: dict[str, str],
        held_id: bool = False,
    ) -> Any:
        async with self._slots:
            if self._limiter:
                await self._limiter.acquire()
            started = time.monotonic()
            try:
                reply = await self._http.send(endpoint.method, path, body, headers)
            except NoAnswer as exc:
                self._observe(endpoint, None, started)
                raise RetryableError(endpoint.name, self._describe(exc)) from None
        self._observe(endpoint, reply.status, started)
        return self._unwrap(endpoint, reply, held_id)

    def _observe(self, endpoint: Endpoint, status: int | None, started: float) -> None:
        if self._observer:
            self._observer.gateway_call(endpoint.name, status, time.monotonic() - started)

    def _describe(self, exc: NoAnswer) -> str:
        # NoAnswer says what happened in plain words; the URL shown has no password.
        return scrub(f"gateway {self.identity}: {exc}", self._api_key)

    def _unwrap(self, endpoint: Endpoint, reply: Reply, held_id: bool = False) -> Any:
        """The envelope's ``data``, or the error the answer amounts to. A 2xx answer we
        cannot read is ``UnreadableAnswer``: the call may or may not have taken effect.
        So is a 404 for an id the gateway gave us (``held_id``): a stray answer, not a
        statement that the object is gone."""
        status = reply.status
        payload = _json(reply.body)
        if status < 400:
            data = self._data(endpoint, reply, payload)
            if data is not None:
                return data  # nearly every answer: no message to build
        message = self._server_message(payload) or (
            reply.body[:200].decode(errors="replace").strip() or reply.reason
        )
        message = scrub(message, self._api_key)
        if status < 400:
            what = "success: false" if isinstance(payload, dict) else "not a JSON envelope"
            raise UnreadableAnswer(endpoint.name, f"{what}: {message}", status)
        if status == 404 and held_id:
            raise UnreadableAnswer(endpoint.name, f"{message} (looked at again)", status)
        if retryable_status(status):
            raise RetryableError(
                endpoint.name,
                message,
                status,
                retry_after=parse_retry_after(reply.headers.get("Retry-After")),
            )
        raise permanent_for_status(status)(endpoint.name, message, status)

    def _data(self, endpoint: Endpoint, reply: Reply, payload: Any) -> Any:
        """A 2xx answer's data; None when it cannot be read (no envelope, success false)."""
        if isinstance(payload, dict) and payload.get("success") is not False:
            data = payload.get("data")
            return {} if data is None else data
        return None

    @staticmethod
    def _server_message(payload: Any) -> str | None:
        if not isinstance(payload, dict):
            return None
        for key in ("error", "message", "detail", "data"):
            source = payload.get(key)
            message = error_text(source) or (
                error_text(source.get("detail")) if isinstance(source, dict) else None
            )
            if message:
                return message
        return None

    def _parse(self, endpoint: Endpoint, model: type[M], data: Any) -> M:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise UnreadableAnswer(endpoint.name, f"unexpected answer: {problems}") from None


def _path_segment(object_id: str) -> str:
    """``object_id`` quoted as one path segment, whatever characters it holds."""
    return quote(object_id, safe="")


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None


__all__ = [
    "CallObserver",
    "CreatedDataset",
    "CreatedFinetune",
    "Dataset",
    "Endpoint",
    "Finetune",
    "GatewayClient",
    "GatewayError",
]
