from __future__ import annotations

from pathlib import Path

import yaml

from orchestrator.statuses import Phase, default_status_map


def test_documented_statuses_map_to_their_phases() -> None:
    statuses = default_status_map()
    assert statuses.phase_of("pk_dataset_validation_successfull") is Phase.VALIDATED
    assert statuses.phase_of("provider_finetune_in_progress") is Phase.TRAINING
    assert statuses.phase_of("something_new") is None
    assert statuses.phase_of(None) is None


def test_default_map_is_the_configs_file() -> None:
    raw = yaml.safe_load((Path(__file__).parents[2] / "configs/statuses.yaml").read_text())
    assert default_status_map().as_dict() == raw


def test_overrides_replace_a_phase_and_move_strings() -> None:
    base = default_status_map()
    custom = base.with_overrides({Phase.SUCCEEDED: ["done", "provider_finetune_failed"]})
    assert custom.phase_of("done") is Phase.SUCCEEDED
    assert custom.phase_of("provider_finetune_succeeded") is None  # replaced
    assert custom.phase_of("provider_finetune_failed") is Phase.SUCCEEDED  # moved
    assert base.phase_of("provider_finetune_failed") is Phase.FAILED  # the default is intact


def test_simulator_only_answers_mapped_statuses() -> None:
    from orchestrator.simulator import world

    statuses = default_status_map()
    answered = [v for k, v in vars(world).items() if k.isupper() and isinstance(v, str)]
    assert answered and all(statuses.phase_of(s) is not None for s in answered)
