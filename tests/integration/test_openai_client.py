"""The official ``openai`` client against the simulator's OpenAI-compatible dialect: its
answers have the shapes that real clients parse (files, uploads in parts, jobs with
metadata, events, cancel, errors)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import openai
import pytest

from orchestrator.simulator import SimulatorThread
from tests.conftest import write_dataset


def client_for(sim: SimulatorThread, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{sim.url}/v1", api_key=key or sim.simulator.config.api_key, max_retries=0
    )


def test_files_jobs_events_and_cancel(sim: SimulatorThread, tmp_path: Path) -> None:
    client = client_for(sim)
    data = write_dataset(tmp_path / "train.jsonl")
    with data.open("rb") as handle:
        file = client.files.create(file=handle, purpose="fine-tune")
    assert file.id.startswith("file-") and file.bytes == data.stat().st_size
    assert file.filename == "train.jsonl" and file.purpose == "fine-tune"
    assert [f.id for f in client.files.list(purpose="fine-tune").data] == [file.id]

    job = client.fine_tuning.jobs.create(
        model="gpt-4o-mini",
        training_file=file.id,
        suffix="support",
        seed=7,
        metadata={"team": "a"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    assert job.status == "validating_files" and job.metadata == {"team": "a"} and job.seed == 7
    assert job.method is not None and job.method.type == "supervised"
    assert client.fine_tuning.jobs.retrieve(job.id).training_file == file.id
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "a"}).data] == [job.id]
    assert client.fine_tuning.jobs.list(metadata={"team": "b"}).data == []
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id).data]
    assert any("Validating training file" in m for m in messages)

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.AuthenticationError):
        client_for(sim, "wrong-key").files.list()


def test_a_job_runs_to_its_end_with_a_model_and_tokens(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    client = client_for(sim)
    with write_dataset(tmp_path / "t.jsonl").open("rb") as handle:
        file = client.files.create(file=handle, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=file.id)
    import time

    deadline = time.monotonic() + 20
    while job.status not in ("succeeded", "failed") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded" and job.fine_tuned_model and job.trained_tokens
    assert job.finished_at is not None and job.error is None


def test_uploads_in_parts(sim: SimulatorThread, tmp_path: Path) -> None:
    client = client_for(sim)
    data = write_dataset(tmp_path / "big.jsonl", examples=200)
    raw = data.read_bytes()
    upload = client.uploads.create(
        bytes=len(raw), filename="big.jsonl", mime_type="application/jsonl", purpose="fine-tune"
    )
    half = len(raw) // 2
    parts = [
        client.uploads.parts.create(upload_id=upload.id, data=chunk)
        for chunk in (raw[:half], raw[half:])
    ]
    done = client.uploads.complete(
        upload_id=upload.id, part_ids=[p.id for p in parts], md5=hashlib.md5(raw).hexdigest()
    )
    assert done.status == "completed" and done.file is not None and done.file.bytes == len(raw)
    with pytest.raises(openai.BadRequestError, match="md5"):
        other = client.uploads.create(
            bytes=len(raw), filename="b.jsonl", mime_type="application/jsonl", purpose="fine-tune"
        )
        part = client.uploads.parts.create(upload_id=other.id, data=raw)
        client.uploads.complete(upload_id=other.id, part_ids=[part.id], md5="0" * 32)
