"""Uploads through whole `run` processes: flat memory, upload once, fresh URLs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from orchestrator.simulator import SimulatorThread
from tests.conftest import (
    FAST_POLL,
    cli_env,
    run_cli,
    run_measured,
    write_big_dataset,
    write_dataset,
    write_manifest,
)


@pytest.mark.slow
def test_a_large_upload_keeps_memory_flat(sim: SimulatorThread, tmp_path: Path) -> None:
    small = write_dataset(tmp_path / "data/small.jsonl", examples=20)
    big = write_big_dataset(tmp_path / "data/big.jsonl", megabytes=320)
    env = cli_env(sim)
    rss = {}
    for name in ("small", "big"):
        manifest = write_manifest(
            tmp_path / f"{name}.yaml", [{"name": name, "dataset": f"data/{name}.jsonl"}]
        )
        code, rss[name] = run_measured(
            "run", str(manifest), "--state", str(tmp_path / f"{name}.db"), *FAST_POLL, env=env
        )
        assert code == 0
    # The 320 MB file went through the check pass and the PUT without growing the process.
    assert rss["big"] - rss["small"] < 40 * 1024, rss
    key = next(k for k in sim.simulator.world.objects if k.endswith("/big.jsonl"))
    _, md5, size = sim.simulator.world.objects[key]
    assert size == big.stat().st_size
    digest = hashlib.md5()
    with big.open("rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    assert md5 == digest.hexdigest()
    assert sim.journal.storage_chunked == 0 and sim.journal.storage_api_key_leaks == 0
    assert small.exists()


def test_identical_content_is_uploaded_once_even_across_reruns(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    write_dataset(tmp_path / "data/shared.jsonl")
    (tmp_path / "data/copy.jsonl").write_bytes((tmp_path / "data/shared.jsonl").read_bytes())
    jobs = [
        {"name": "a", "dataset": "data/shared.jsonl"},
        {"name": "b", "dataset": "data/shared.jsonl", "hyperparameters": {"epochs": 3}},
        {"name": "c", "dataset": "data/copy.jsonl"},  # same bytes, other file name
        {"name": "d", "dataset": "data/shared.jsonl", "model": "gpt-4o"},  # other model
    ]
    manifest = write_manifest(tmp_path / "m.yaml", jobs)
    state = tmp_path / "state.db"
    env = cli_env(sim)
    assert run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env).returncode == 0
    assert sim.journal.uploads == 2  # one for gpt-4o-mini, one for gpt-4o
    jobs.append({"name": "e", "dataset": "data/copy.jsonl"})
    write_manifest(tmp_path / "m.yaml", jobs)
    assert run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env).returncode == 0
    assert sim.journal.uploads == 2 and sum(sim.journal.dataset_creates.values()) == 2
    status = json.loads(run_cli("status", "--json", "--state", str(state), env=env).stdout)
    by_name = {j["name"]: j for j in status}
    assert by_name["a"]["dataset_id"] == by_name["c"]["dataset_id"] == by_name["e"]["dataset_id"]
    assert by_name["d"]["dataset_id"] != by_name["a"]["dataset_id"]


def test_expired_urls_abandon_datasets_and_status_shows_them(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    sim.simulator.config.update({"url_ttl": 1, "storage_latency": 2.2})
    write_dataset(tmp_path / "data/a.jsonl")
    manifest = write_manifest(tmp_path / "m.yaml", [{"name": "a", "dataset": "data/a.jsonl"}])
    state = tmp_path / "state.db"
    env = cli_env(sim)
    out = run_cli("run", str(manifest), "--state", str(state), *FAST_POLL, env=env)
    assert out.returncode == 1
    job = json.loads(run_cli("status", "--json", "--state", str(state), env=env).stdout)[0]
    assert job["state"] == "failed" and "expired" in job["error"]
    assert len(job["abandoned_datasets"]) == 3  # the first three URLs; the fourth failed the job
    assert sim.journal.dataset_creates["a.jsonl"] == 4
    table = run_cli("status", "--state", str(state), env=env).stdout
    assert "abandoned" in table.splitlines()[0]
    assert ", ".join(job["abandoned_datasets"]) in table
