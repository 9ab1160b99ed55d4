from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.statuses import Phase, default_status_map, suggestion


def test_documented_statuses_map_to_their_phases() -> None:
    statuses = default_status_map()
    assert statuses.phase_of("pk_dataset_validation_successfull") is Phase.VALIDATED
    assert statuses.phase_of("provider_finetune_in_progress") is Phase.TRAINING
    assert statuses.phase_of("something_new") is None
    assert statuses.phase_of(None) is None


def test_default_map_is_the_configs_file() -> None:
    raw = yaml.safe_load((Path(__file__).parents[2] / "configs/statuses.yaml").read_text())
    assert default_status_map().as_dict() == raw


def test_overrides_add_to_a_phase_and_move_strings() -> None:
    base = default_status_map()
    custom = base.with_overrides({Phase.SUCCEEDED: ["Done", "provider_finetune_failed"]})
    assert custom.phase_of("done") is Phase.SUCCEEDED  # case does not matter
    assert custom.phase_of("provider_finetune_succeeded") is Phase.SUCCEEDED  # kept
    assert custom.phase_of("provider_finetune_failed") is Phase.SUCCEEDED  # moved
    assert base.phase_of("provider_finetune_failed") is Phase.FAILED  # the default is intact


@pytest.mark.parametrize(
    ("status", "phase"),
    [
        ("provider_finetune_successfull", Phase.SUCCEEDED),  # the documented double-l
        ("provider_finetune_successful", Phase.SUCCEEDED),
        ("succeeded", Phase.SUCCEEDED),
        ("completed", Phase.SUCCEEDED),
        ("provider_finetune_failed", Phase.FAILED),
        ("failed", Phase.FAILED),
        ("cancelled", Phase.CANCELLED),
        ("canceled", Phase.CANCELLED),
        ("provider_finetune_canceled", Phase.CANCELLED),
        ("queued", Phase.TRAINING),
        ("running", Phase.TRAINING),
        ("pk_dataset_validation_successful", Phase.VALIDATED),
        ("PK_DATASET_VALIDATION_SUCCESSFULL", Phase.VALIDATED),
    ],
)
def test_the_default_map_knows_the_plausible_spellings(status: str, phase: Phase) -> None:
    assert default_status_map().phase_of(status) is phase


@pytest.mark.parametrize(
    ("status", "waiting", "line"),
    [
        (
            "provider_finetune_done_ok",
            Phase.TRAINING,
            "statuses: {succeeded: [provider_finetune_done_ok]}",
        ),
        ("weird_thing", Phase.TRAINING, "statuses: {training: [weird_thing]}"),
        ("pk_check_error", Phase.VALIDATING, "statuses: {validation_failed: [pk_check_error]}"),
        ("pk_check_complete", Phase.VALIDATING, "statuses: {validated: [pk_check_complete]}"),
    ],
)
def test_an_unknown_status_gets_the_line_that_would_map_it(
    status: str, waiting: Phase, line: str
) -> None:
    assert suggestion(status, waiting) == line
    ((phase, strings),) = yaml.safe_load(line)["statuses"].items()
    assert strings == [status] and default_status_map().phase_of(status) is None
    custom = default_status_map().with_overrides({Phase(phase): strings})
    assert custom.phase_of(status) is Phase(phase)


def test_simulator_answers_only_mapped_statuses_in_either_spelling() -> None:
    from orchestrator.simulator import world

    statuses = default_status_map()
    answered = [
        v
        for k, v in vars(world).items()
        if k.isupper() and isinstance(v, str) and not k.startswith("UNKNOWN")
    ]
    answered += list(world.ALTERNATIVE_SPELLING.values())
    assert answered and all(statuses.phase_of(s) is not None for s in answered)
    assert statuses.phase_of(world.UNKNOWN_SUCCESS) is None
