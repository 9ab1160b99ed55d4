from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.manifest import ManifestError, load_manifest
from orchestrator.statuses import Phase
from tests.conftest import write_dataset

GOOD = """\
gateway:
  base_url: ${BASE:-http://127.0.0.1:8080}
  api_key: ${KEY}
defaults:
  provider: openai
  model: gpt-4o-mini
  virtual_key: vk-openai
  hyperparameters: {epochs: 1, batch_size: 4}
statuses:
  succeeded: [all_done]
jobs:
  - name: support-v1
    dataset: data/support.jsonl
  - name: legal-v2
    s3_key: datasets/legal.jsonl
    provider: bedrock
    model: amazon.titan-text-lite-v1
    override_model: amazon.titan-text-lite-v1:0:4k
    hyperparameters: {epochs: 2, custom_knob: fast}
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_dataset(tmp_path / "data/support.jsonl")
    return tmp_path


def load(folder: Path, text: str, env: dict[str, str] | None = None) -> object:
    path = folder / "manifest.yaml"
    path.write_text(text, "utf-8")
    return load_manifest(path, {"KEY": "k-123"} if env is None else env)


def error_of(folder: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ManifestError) as caught:
        load(folder, text, env)
    message = str(caught.value)
    assert "\n" not in message
    return message.split("manifest.yaml", 1)[1]


def test_the_documented_shape_loads(folder: Path) -> None:
    manifest = load(folder, GOOD)
    assert manifest.base_url == "http://127.0.0.1:8080" and manifest.api_key == "k-123"  # type: ignore[attr-defined]
    support, legal = manifest.jobs  # type: ignore[attr-defined]
    assert support.provider == "openai" and support.hyperparameters == {
        "epochs": 1,
        "batch_size": 4,
    }
    assert support.dataset_name == "support.jsonl" and support.dataset_path.is_file()
    assert legal.s3_key == "datasets/legal.jsonl" and legal.dataset_name == "legal.jsonl"
    assert legal.hyperparameters == {"epochs": 2, "batch_size": 4, "custom_knob": "fast"}
    assert legal.override_model == "amazon.titan-text-lite-v1:0:4k"
    assert manifest.statuses.phase_of("all_done") is Phase.SUCCEEDED  # type: ignore[attr-defined]


def test_gateway_may_come_from_the_environment(folder: Path) -> None:
    text = GOOD.split("defaults:", 1)[1]
    manifest = load(
        folder,
        "defaults:" + text,
        {"PORTKEY_BASE_URL": "https://gw.example/", "PORTKEY_API_KEY": "env-key"},
    )
    assert manifest.base_url == "https://gw.example" and manifest.api_key == "env-key"  # type: ignore[attr-defined]


def test_fingerprint_follows_spec_and_content(folder: Path) -> None:
    support = load(folder, GOOD).jobs[0]  # type: ignore[attr-defined]
    assert support.fingerprint("aaa") == support.fingerprint("aaa")
    assert support.fingerprint("aaa") != support.fingerprint("bbb")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD.replace("{epochs: 2, custom_knob: fast}", "{epochs: 0}"),
            ":19: jobs[1] (legal-v2).hyperparameters.epochs: must be a positive integer",
        ),
        (
            GOOD.replace("{epochs: 2, custom_knob: fast}", "{epochs: two}"),
            ":19: jobs[1] (legal-v2).hyperparameters.epochs: must be a positive integer",
        ),
        (
            GOOD.replace("    override_model:", "    overide_model:"),
            ":18: jobs[1] (legal-v2).overide_model: unknown field",
        ),
        (
            GOOD.replace("name: legal-v2", "name: support-v1"),
            ":14: jobs[1] (support-v1).name: duplicate job name (first used by jobs[0])",
        ),
        (
            GOOD.replace("name: legal-v2", "name: has space"),
            ":14: jobs[1] (has space).name: must be 1-64 characters",
        ),
        (
            GOOD.replace("    s3_key: datasets/legal.jsonl\n", ""),
            ":14: jobs[1] (legal-v2): needs exactly one of 'dataset' (a local file) or 's3_key'",
        ),
        (
            GOOD.replace(
                "    s3_key: datasets/legal.jsonl\n",
                "    s3_key: a.jsonl\n    dataset: data/support.jsonl\n",
            ),
            ":14: jobs[1] (legal-v2): needs exactly one of",
        ),
        (
            GOOD.replace("data/support.jsonl", "data/missing.jsonl"),
            ":13: jobs[0] (support-v1).dataset: file not found: data/missing.jsonl",
        ),
        (
            GOOD.replace("data/support.jsonl", "data"),
            ":13: jobs[0] (support-v1).dataset: not a regular file: data",
        ),
        (
            GOOD.replace("  virtual_key: vk-openai\n", ""),
            ":11: jobs[0] (support-v1).virtual_key: required (in the job or in defaults)",
        ),
        (
            GOOD.replace("${BASE:-http://127.0.0.1:8080}", "ftp://x"),
            ":2: gateway.base_url: must be an http:// or https:// URL",
        ),
        (
            GOOD.replace("succeeded: [all_done]", "finished: [all_done]"),
            ":10: statuses.finished: is not a known phase",
        ),
        (GOOD.replace("jobs:\n", "jobs: []\nold_jobs:\n"), ":12: old_jobs: unknown field"),
        (GOOD.split("jobs:")[0] + "jobs: []\n", ":11: jobs: must list at least one job"),
        (GOOD.split("jobs:")[0], ":1: jobs: required field is missing"),
        (
            GOOD.replace("  model: gpt-4o-mini\n", "  model: gpt-4o-mini\n  model: gpt-4o\n"),
            ":7: defaults.model: duplicate key",
        ),
        (
            GOOD.replace("epochs: 1, batch_size: 4}", "epochs: 1, batch_size: 4"),
            ":9: YAML syntax error",
        ),
        ("- just\n- a list\n", ":1: manifest must be a mapping"),
        ("", ":1: manifest is empty"),
        (
            GOOD.replace("jobs:\n  - name", "jobs:\n  - 7\n  - name"),
            ":12: jobs[0]: must be a mapping",
        ),
    ],
)
def test_errors_name_file_line_and_field(folder: Path, text: str, expected: str) -> None:
    assert error_of(folder, text).startswith(expected)


def test_unset_variable_names_the_variable(folder: Path) -> None:
    assert error_of(folder, GOOD, env={}) == (
        ":3: gateway.api_key: environment variable KEY is not set (or empty)"
    )


def test_not_utf8(folder: Path) -> None:
    path = folder / "manifest.yaml"
    path.write_bytes(GOOD.encode().replace(b"support-v1", b"supp\xffort"))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path, {"KEY": "k"})
    assert str(caught.value).endswith("manifest.yaml:12: not valid UTF-8")


def test_missing_manifest_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such file"):
        load_manifest(tmp_path / "nope.yaml", {})
    with pytest.raises(ManifestError, match="is a directory"):
        load_manifest(tmp_path, {})


DIALECTS = """\
gateway:
  base_url: http://127.0.0.1:8080
  api_key: k
  api: fine_tuning
  auth: bearer
  headers: {x-portkey-config: "${CONFIG}"}
defaults:
  provider: openai
  model: gpt-4o-mini
jobs:
  - name: tuned
    dataset: data/support.jsonl
    suffix: support
    seed: 7
    metadata: {team: search}
  - name: classic
    api: finetune
    dataset: data/support.jsonl
    virtual_key: vk-openai
"""


def test_each_job_has_its_dialect_and_the_gateway_its_auth_and_headers(folder: Path) -> None:
    manifest = load(folder, DIALECTS, {"CONFIG": "cfg-secret"})
    assert manifest.auth == "bearer"  # type: ignore[attr-defined]
    assert manifest.headers == (("x-portkey-config", "cfg-secret"),)  # type: ignore[attr-defined]
    tuned, classic = manifest.jobs  # type: ignore[attr-defined]
    assert (tuned.api, tuned.suffix, tuned.seed, tuned.metadata) == (
        "fine_tuning",
        "support",
        7,
        {"team": "search"},
    )
    assert classic.api == "finetune" and classic.suffix is None
    # A finetune job's fingerprint is the one it had before dialects existed.
    assert classic.fingerprint("abc") == classic.__class__(
        **{**classic.__dict__, "api": "finetune"}
    ).fingerprint("abc")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("    virtual_key: vk-openai\n", "    virtual_key: vk-openai\n    suffix: x\n"),
            ":20: jobs[1] (classic).suffix: only for api: fine_tuning (this job's api is finetune)",
        ),
        (
            ("    suffix: support\n", "    suffix: support\n    override_model: m\n"),
            ":14: jobs[0] (tuned).override_model: only for api: finetune",
        ),
        (
            ("    dataset: data/support.jsonl\n    suffix", "    s3_key: k.jsonl\n    suffix"),
            ":12: jobs[0] (tuned).s3_key: api: fine_tuning uploads a local file",
        ),
        (
            ("  api: fine_tuning\n", "  api: openai\n"),
            ":4: gateway.api: must be 'finetune' or 'fine_tuning'",
        ),
        (
            ("{team: search}", "{orchestrator_job: x}"),
            "metadata: 'orchestrator_job': keys starting 'orchestrator_' are the orchestrator's",
        ),
        (
            ("    seed: 7\n", "    seed: 7\n    epochs: 2\n"),
            "jobs[0] (tuned).epochs: unknown field",
        ),
        (
            (
                "    virtual_key: vk-openai\n",
                "    virtual_key: vk-openai\n    validation_dataset: v\n",
            ),
            "(classic).validation_dataset: only for api: fine_tuning",
        ),
        (
            ("    seed: 7\n", "    seed: 7\n    validation_dataset: data/nope.jsonl\n"),
            ":15: jobs[0] (tuned).validation_dataset: file not found: data/nope.jsonl",
        ),
    ],
)
def test_each_dialect_refuses_the_other_dialects_fields(
    folder: Path, change: tuple[str, str], expected: str
) -> None:
    assert change[0] in DIALECTS
    assert expected in error_of(folder, DIALECTS.replace(*change), {"CONFIG": "c"})
