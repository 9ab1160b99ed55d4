"""The bad-input corpus (tests/corpus): every malformed manifest is one clear line and
exit 2, with no traceback, no request to the gateway and the state file untouched; every
malformed dataset fails its own job only, before the gateway hears of it."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import datasets
from orchestrator.simulator import SimConfig, SimulatorThread
from tests.conftest import FAST, cli_env, run_cli, write_manifest

CORPUS = Path(__file__).parent.parent / "corpus"
MANIFESTS = sorted((CORPUS / "manifests").glob("*.yaml"))
DATASET_EXPECTED: dict[str, str] = json.loads((CORPUS / "datasets/EXPECTED.json").read_text())


@pytest.fixture(scope="module")
def corpus_sim() -> Iterator[SimulatorThread]:
    simulator = SimulatorThread(SimConfig(seed=5, **FAST))
    simulator.start()
    yield simulator
    simulator.stop()


@pytest.fixture(scope="module")
def baseline_state(tmp_path_factory: pytest.TempPathFactory, corpus_sim: SimulatorThread) -> Path:
    """A state file with a finished job in it, as a user's would be."""
    folder = tmp_path_factory.mktemp("baseline")
    shutil.copy(CORPUS / "data/good.jsonl", folder / "good.jsonl")
    manifest = write_manifest(folder / "m.yaml", [{"name": "earlier", "dataset": "good.jsonl"}])
    state = folder / "state.db"
    out = run_cli(
        "run",
        str(manifest),
        "--state",
        str(state),
        "--poll-interval",
        "0.05",
        env=cli_env(corpus_sim),
    )
    assert out.returncode == 0, out.stderr
    return state


def total_requests(sim: SimulatorThread) -> int:
    return sum(sim.journal.requests.values()) + sum(sim.journal.faults.values())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_corpus_is_big_enough() -> None:
    assert len(MANIFESTS) + len(DATASET_EXPECTED) >= 25


@pytest.mark.parametrize("manifest", MANIFESTS, ids=[m.stem for m in MANIFESTS])
def test_malformed_manifest(
    manifest: Path, corpus_sim: SimulatorThread, baseline_state: Path, tmp_path: Path
) -> None:
    expected = manifest.read_bytes().split(b"\n", 1)[0].decode().removeprefix("# expect: ")
    if expected[0].isdigit():  # "7: field: message" means line 7 of that file
        expected = f"{manifest.name}:{expected}"
    state = tmp_path / "state.db"
    shutil.copy(baseline_state, state)
    before, requests = digest(state), total_requests(corpus_sim)
    out = run_cli("run", str(manifest), "--state", str(state), env=cli_env(corpus_sim))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith(f"error: {manifest}:"), lines[0]
    assert expected in lines[0], lines[0]
    assert out.stdout == ""
    assert total_requests(corpus_sim) == requests  # nothing sent
    assert digest(state) == before  # nothing stored
    assert not (tmp_path / "state.db-wal").exists() or digest(state) == before


@pytest.fixture
def huge_line_dataset(tmp_path: Path) -> Path:
    path = tmp_path / "huge-line.jsonl"
    good = (CORPUS / "data/good.jsonl").read_bytes()
    with path.open("wb") as handle:
        handle.write(good.split(b"\n", 1)[0] + b"\n")
        handle.write(b'{"messages": "' + b"x" * (datasets.MAX_LINE_BYTES + 10) + b'"}\n')
        handle.write(good)
    return path


def dataset_paths(huge: Path) -> dict[str, Path]:
    paths = {p.name: p for p in (CORPUS / "datasets").glob("*.jsonl")}
    paths[huge.name] = huge
    assert set(paths) == set(DATASET_EXPECTED)
    return paths


def test_malformed_datasets_fail_validate_with_one_line_each(
    corpus_sim: SimulatorThread, huge_line_dataset: Path, tmp_path: Path
) -> None:
    for name, path in sorted(dataset_paths(huge_line_dataset).items()):
        manifest = write_manifest(tmp_path / f"{name}.yaml", [{"name": "j", "dataset": str(path)}])
        out = run_cli("validate", str(manifest), env=cli_env())
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert out.returncode == 2 and "Traceback" not in out.stderr, (name, out.stderr)
        assert len(errors) == 1 and errors[0].startswith(f"error: {path}:"), errors
        assert DATASET_EXPECTED[name] in errors[0], errors[0]


def test_malformed_datasets_fail_only_their_own_jobs(
    corpus_sim: SimulatorThread, huge_line_dataset: Path, tmp_path: Path
) -> None:
    paths = dataset_paths(huge_line_dataset)
    jobs = [{"name": "good", "dataset": str(CORPUS / "data/good.jsonl")}]
    jobs += [{"name": f"bad-{i}", "dataset": str(p)} for i, p in enumerate(paths.values())]
    manifest = write_manifest(tmp_path / "m.yaml", jobs)
    state = tmp_path / "state.db"
    env = cli_env(corpus_sim)
    out = run_cli("run", str(manifest), "--state", str(state), "--poll-interval", "0.05", env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    status = {
        j["name"]: j
        for j in json.loads(run_cli("status", "--json", "--state", str(state), env=env).stdout)
    }
    assert status["good"]["state"] == "succeeded"
    for i, (name, path) in enumerate(paths.items()):
        job = status[f"bad-{i}"]
        assert job["state"] == "failed" and job["finetune_id"] is None
        assert job["error"].startswith(f"{path}:") and DATASET_EXPECTED[name] in job["error"]
        assert name not in corpus_sim.journal.dataset_creates  # never reached the gateway
