"""What the simulated gateway knows: datasets, finetunes, stored objects, and its journal.

Statuses advance lazily: each read compares the clock with the recorded start times,
so thousands of finetunes cost no background tasks. Only dataset validation runs in
the background, because it reads the uploaded object for real.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.simulator.config import SimConfig

# The strings the simulator answers with; configs/statuses.yaml maps each of them.
CREATED = "pk_finetune_created"
ATTACHED = "pk_dataset_attached"
VALIDATION_STARTED = "pk_dataset_validation_started"
VALIDATION_IN_PROGRESS = "pk_dataset_validation_in_progress"
VALIDATION_OK = "pk_dataset_validation_successfull"  # sic, as the real gateway spells it
VALIDATION_FAILED = "pk_dataset_validation_failed"
QUEUED = "provider_finetune_queued"
TRAINING = "provider_finetune_in_progress"
SUCCEEDED = "provider_finetune_succeeded"
FAILED = "provider_finetune_failed"
CANCELLED = "provider_finetune_cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

# Other spellings a deployment may use for the same statuses (SimConfig.status_spelling).
ALTERNATIVE_SPELLING = {
    VALIDATION_STARTED: "pk_dataset_validation_queued",
    VALIDATION_IN_PROGRESS: "validating",
    VALIDATION_OK: "pk_dataset_validation_successful",
    VALIDATION_FAILED: "validation_failed",
    QUEUED: "queued",
    TRAINING: "running",
    SUCCEEDED: "provider_finetune_successfull",
    FAILED: "failed",
    CANCELLED: "provider_finetune_canceled",
}
UNKNOWN_SUCCESS = "provider_finetune_done_ok"  # a spelling no status map knows
UNKNOWN_VIRTUAL_KEY = "vk-unknown"  # virtual keys starting so are refused (400)


class Conflict(Exception):
    """The call is out of order (answered 409)."""


class BadRequest(Exception):
    """The request body is invalid (answered 400)."""


class Missing(Exception):
    """No such object (answered 404)."""


@dataclass
class SimDataset:
    id: str
    name: str
    provider: str
    model: str
    type: str
    key: str  # where the signed URL puts the object
    s3_path: str | None = None
    created_at: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "provider": self.provider,
            "model": self.model,
            "type": self.type,
            "s3Path": self.s3_path,
            "status": "uploaded" if self.s3_path else "created",
            "createdAt": _iso(self.created_at),
        }


@dataclass
class SimFinetune:
    id: str
    name: str
    virtual_key: str
    provider: str
    model: str
    hyperparameters: dict[str, Any]
    status: str = CREATED
    training_dataset_id: str | None = None
    override_model: str | None = None
    slug: str | None = None
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    # Monotonic deadlines for lazy progression.
    validation_at: float | None = None
    validation_result: tuple[bool, str | None] | None = None
    started_at: float | None = None
    training_will_fail: bool = False
    records: int | None = None  # examples in the validated dataset


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


class World:
    def __init__(self, config: SimConfig, data_dir: Path) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.objects_dir = data_dir / "objects"
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        self.datasets: dict[str, SimDataset] = {}
        self.finetunes: dict[str, SimFinetune] = {}
        self.objects: dict[str, tuple[Path, str, int]] = {}  # key -> (file, md5, size)
        self.idempotency: dict[tuple[str, str], str] = {}
        self.journal = Journal()

    # ------------------------------------------------------------------ datasets

    def create_dataset(self, body: dict[str, Any], idem_key: str | None) -> tuple[SimDataset, bool]:
        fields_ = _require_strings(body, "name", "provider", "model")
        if idem_key and ("dataset", idem_key) in self.idempotency:
            self.journal.idempotent_replays += 1
            return self.datasets[self.idempotency[("dataset", idem_key)]], False
        ds_id = f"ds_{uuid.UUID(int=self.rng.getrandbits(128)).hex[:20]}"
        key = f"datasets/{ds_id}/{fields_['name']}"
        dataset = SimDataset(
            id=ds_id,
            name=fields_["name"],
            provider=fields_["provider"],
            model=fields_["model"],
            type=str(body.get("type") or "training"),
            key=key,
        )
        self.datasets[ds_id] = dataset
        if idem_key:
            self.idempotency[("dataset", idem_key)] = ds_id
        self.journal.dataset_creates[dataset.name] += 1
        return dataset, True

    def update_dataset(self, ds_id: str, body: dict[str, Any]) -> None:
        dataset = self._dataset(ds_id)
        dataset.s3_path = _require_strings(body, "s3_path")["s3_path"]

    def _dataset(self, ds_id: str) -> SimDataset:
        try:
            return self.datasets[ds_id]
        except KeyError:
            raise Missing(f"dataset {ds_id} not found") from None

    # ----------------------------------------------------------------- finetunes

    def create_finetune(
        self, body: dict[str, Any], idem_key: str | None
    ) -> tuple[SimFinetune, bool]:
        fields_ = _require_strings(body, "name", "virtual_key", "provider", "model")
        if fields_["virtual_key"].startswith(UNKNOWN_VIRTUAL_KEY):
            raise BadRequest(f"virtual key {fields_['virtual_key']} does not exist")
        hyper = body.get("hyperparameters", {})
        if not isinstance(hyper, dict):
            raise BadRequest("hyperparameters must be an object")
        if idem_key and ("finetune", idem_key) in self.idempotency:
            self.journal.idempotent_replays += 1
            return self.finetunes[self.idempotency[("finetune", idem_key)]], False
        ft_id = f"ft_{uuid.UUID(int=self.rng.getrandbits(128)).hex[:20]}"
        finetune = SimFinetune(
            id=ft_id,
            name=fields_["name"],
            virtual_key=fields_["virtual_key"],
            provider=fields_["provider"],
            model=fields_["model"],
            hyperparameters=hyper,
        )
        self.finetunes[ft_id] = finetune
        if idem_key:
            self.idempotency[("finetune", idem_key)] = ft_id
        self.journal.finetune_creates[finetune.name] += 1
        return finetune, True

    def finetune(self, ft_id: str) -> SimFinetune:
        try:
            finetune = self.finetunes[ft_id]
        except KeyError:
            raise Missing(f"finetune {ft_id} not found") from None
        self._advance(finetune)
        return finetune

    def attach_dataset(self, ft_id: str, body: dict[str, Any]) -> None:
        finetune = self.finetune(ft_id)
        ds_id = _require_strings(body, "training_dataset_id")["training_dataset_id"]
        if ds_id not in self.datasets:
            raise BadRequest(f"training_dataset_id {ds_id} does not exist")
        if finetune.started_at is not None:
            raise Conflict(f"finetune {ft_id} has already been started")
        # Attaching resets the finetune, as the API reference says.
        finetune.training_dataset_id = ds_id
        finetune.status = ATTACHED
        finetune.validation_at = None
        finetune.validation_result = None
        finetune.error = None
        self._touch(finetune)

    def start_validation(self, ft_id: str) -> tuple[SimFinetune, Path | None] | None:
        """Begin validation; returns what to check in the background, None if already on."""
        finetune = self.finetune(ft_id)
        if finetune.training_dataset_id is None:
            raise Conflict("no training dataset is attached")
        if finetune.started_at is not None:
            raise Conflict(f"finetune {ft_id} has already been started")
        if finetune.status in (VALIDATION_STARTED, VALIDATION_IN_PROGRESS, VALIDATION_OK):
            return None  # repeating the call is harmless
        dataset = self.datasets[finetune.training_dataset_id]
        if dataset.s3_path is None:
            raise Conflict(f"dataset {dataset.id} has no s3_path yet")
        finetune.status = VALIDATION_STARTED
        finetune.error = None
        finetune.validation_result = None
        finetune.validation_at = time.monotonic() + self.config.validation_seconds
        self._touch(finetune)
        obj = self.objects.get(dataset.s3_path)
        if obj is None:
            finetune.validation_result = (
                False,
                f"dataset object not found in S3: {dataset.s3_path}",
            )
            return finetune, None
        return finetune, obj[0]

    def finish_validation(
        self, finetune: SimFinetune, problem: str | None, records: int | None = None
    ) -> None:
        finetune.records = records
        if problem is None and self.rng.random() < self.config.validation_failure_rate:
            problem = "provider rejected the dataset (injected validation failure)"
        finetune.validation_result = (problem is None, problem)

    def start(self, ft_id: str, body: dict[str, Any]) -> SimFinetune:
        finetune = self.finetune(ft_id)
        self.journal.start_calls[ft_id] += 1
        if finetune.status != VALIDATION_OK:
            raise Conflict(
                f"finetune {ft_id} cannot start in status {finetune.status}; "
                "validation must succeed first"
            )
        override = body.get("override_model")
        if override is not None and not isinstance(override, str):
            raise BadRequest("override_model must be a string")
        finetune.override_model = override
        finetune.started_at = time.monotonic()
        finetune.status = QUEUED
        finetune.training_will_fail = self.rng.random() < self.config.training_failure_rate
        self.journal.starts[ft_id] += 1
        self._touch(finetune)
        return finetune

    def cancel(self, ft_id: str) -> SimFinetune:
        finetune = self.finetune(ft_id)
        if finetune.status in TERMINAL:
            raise Conflict(f"finetune {ft_id} is already {finetune.status}")
        finetune.status = CANCELLED
        self.journal.cancels[ft_id] += 1
        self._touch(finetune)
        return finetune

    def _advance(self, ft: SimFinetune) -> None:
        now = time.monotonic()
        if ft.status in (VALIDATION_STARTED, VALIDATION_IN_PROGRESS) and ft.validation_at:
            if now >= ft.validation_at and ft.validation_result is not None:
                ok, problem = ft.validation_result
                ft.status = VALIDATION_OK if ok else VALIDATION_FAILED
                ft.error = problem
                self._touch(ft)
            elif ft.status == VALIDATION_STARTED and now >= ft.validation_at - (
                self.config.validation_seconds * 2 / 3
            ):
                ft.status = VALIDATION_IN_PROGRESS
                self._touch(ft)
        if ft.status in (QUEUED, TRAINING) and ft.started_at is not None:
            queued_until = ft.started_at + self.config.queue_seconds
            done_at = queued_until + self.config.training_seconds
            if now >= done_at:
                if ft.training_will_fail:
                    ft.status = FAILED
                    ft.error = "provider training job failed (injected training failure)"
                else:
                    ft.status = SUCCEEDED
                    base = ft.override_model or ft.model
                    ft.slug = f"ft:{base}:{ft.name}-{ft.id[-8:]}"
                self._touch(ft)
            elif now >= queued_until and ft.status == QUEUED:
                ft.status = TRAINING
                self._touch(ft)

    @staticmethod
    def _touch(ft: SimFinetune) -> None:
        ft.updated_at = time.time()

    def finetune_json(self, ft: SimFinetune) -> dict[str, Any]:
        dataset = self.datasets.get(ft.training_dataset_id or "")
        error: Any = ft.error
        if error and self.config.error_shape == "object":
            error = {"message": ft.error, "code": "provider_error", "param": None}
        return {
            "id": ft.id,
            "name": ft.name,
            "description": None,
            "slug": ft.slug,
            "status": self.spelled(ft.status),
            "createdAt": _iso(ft.created_at),
            "lastUpdatedAt": _iso(ft.updated_at),
            "trainingDatasetId": ft.training_dataset_id,
            "validationDatasetId": None,
            "hyperparameters": ft.hyperparameters,
            "providerFinetuneId": f"prov-{ft.id[-12:]}" if ft.started_at else None,
            "providerFinetuneSlug": ft.slug,
            "aiModelVersion": ft.override_model or ft.model,
            "aiModelType": "chat",
            "virtualKey": ft.virtual_key,
            "error": error,
            "metadata": self._metadata(ft),
            "trainingDataset": dataset.as_json() if dataset else None,
        }

    def _metadata(self, ft: SimFinetune) -> dict[str, Any]:
        """What the provider reports once a training has finished."""
        if ft.status not in (SUCCEEDED, FAILED) or ft.records is None:
            return {"trainingUnits": None, "trainingRecords": None}
        epochs = ft.hyperparameters.get("epochs") or ft.hyperparameters.get("n_epochs") or 1
        units = ft.records * epochs if isinstance(epochs, int) else None
        return {"trainingUnits": units, "trainingRecords": ft.records}

    def spelled(self, status: str) -> str:
        """A status as this deployment spells it (``SimConfig.status_spelling``)."""
        spelling = self.config.status_spelling
        if spelling == "alternative":
            return ALTERNATIVE_SPELLING.get(status, status)
        if spelling == "unknown" and status == SUCCEEDED:
            return UNKNOWN_SUCCESS
        return status


def _require_strings(body: dict[str, Any], *names: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names:
        value = body.get(name)
        if not isinstance(value, str) or not value:
            raise BadRequest(f"{name} is required and must be a non-empty string")
        out[name] = value
    return out


@dataclass
class Journal:
    """What the simulator was asked; the witness of the idempotency tests."""

    requests: Counter[str] = field(default_factory=Counter)  # endpoint -> handled count
    statuses: Counter[str] = field(default_factory=Counter)  # "endpoint status" -> count
    faults: Counter[str] = field(default_factory=Counter)
    dataset_creates: Counter[str] = field(default_factory=Counter)  # dataset name -> creates
    finetune_creates: Counter[str] = field(default_factory=Counter)  # finetune name -> creates
    starts: Counter[str] = field(default_factory=Counter)  # finetune id -> accepted /start
    start_calls: Counter[str] = field(default_factory=Counter)  # finetune id -> any /start
    cancels: Counter[str] = field(default_factory=Counter)
    idempotent_replays: int = 0
    uploads: int = 0
    upload_bytes: int = 0
    storage_api_key_leaks: int = 0  # requests to the storage route carrying the API key
    storage_unsigned_amz_headers: int = 0
    storage_chunked: int = 0

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(json.dumps(self.__dict__))
        return data


def count_examples(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for raw in handle if raw.strip())


def check_dataset_file(path: Path, max_example_chars: int) -> str | None:
    """The simulated provider's check of an uploaded JSONL file; None when it is valid."""
    count = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                return f"line {number}: not valid UTF-8"
            if len(line) > max_example_chars:
                return f"line {number}: example longer than {max_example_chars} characters"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {number}: invalid JSON ({exc.msg})"
            if not isinstance(record, dict):
                return f"line {number}: expected a JSON object"
            messages = record.get("messages")
            if not isinstance(messages, list) or not messages:
                return f"line {number}: 'messages' must be a non-empty list"
            for index, message in enumerate(messages):
                if (
                    not isinstance(message, dict)
                    or not isinstance(message.get("role"), str)
                    or not isinstance(message.get("content"), str)
                ):
                    return f"line {number}: messages[{index}] must have string role and content"
            count += 1
    if count == 0:
        return "dataset is empty"
    return None
