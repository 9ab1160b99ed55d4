from __future__ import annotations

import itertools

import pytest

from orchestrator.lifecycle import POLLING_STATES, STEPS
from orchestrator.states import (
    TERMINAL,
    TRANSITIONS,
    IllegalTransition,
    JobRecord,
    State,
    check_transition,
)


def test_terminal_states_are_exactly_three() -> None:
    assert {State.SUCCEEDED, State.FAILED, State.CANCELLED} == TERMINAL
    assert all(s.terminal == (s in TERMINAL) for s in State)


def test_every_live_state_has_a_step_and_can_fail_or_be_cancelled() -> None:
    for state in State:
        if state.terminal:
            assert state not in STEPS
            # Only a new attempt: pending, or failed at once for an invalid dataset.
            assert TRANSITIONS[state] == {State.PENDING, State.FAILED}
        else:
            assert state in STEPS
            assert {State.FAILED, State.CANCELLED} <= TRANSITIONS[state]
    assert {State.VALIDATING, State.TRAINING} == POLLING_STATES


def test_happy_path_is_allowed_and_s3_jobs_skip_uploaded() -> None:
    path = [
        State.PENDING,
        State.DATASET_CREATED,
        State.UPLOADED,
        State.DATASET_READY,
        State.FINETUNE_CREATED,
        State.DATASET_ATTACHED,
        State.VALIDATING,
        State.VALIDATED,
        State.TRAINING,
        State.SUCCEEDED,
    ]
    for old, new in itertools.pairwise(path):
        check_transition(old, new)
    check_transition(State.DATASET_CREATED, State.DATASET_READY)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (State.PENDING, State.TRAINING),
        (State.DATASET_READY, State.TRAINING),  # nothing is adopted before a finetune
        (State.DATASET_ATTACHED, State.DATASET_READY),
        (State.SUCCEEDED, State.TRAINING),
        (State.TRAINING, State.VALIDATED),
        (State.CANCELLED, State.SUCCEEDED),
    ],
)
def test_illegal_transitions_are_refused(old: State, new: State) -> None:
    with pytest.raises(IllegalTransition):
        check_transition(old, new)


def test_evolve_copies_changes_and_refuses_unknown_fields() -> None:
    record = JobRecord(name="a", fingerprint="f", updated_at=0.0, abandoned_datasets=("ds_1",))
    later = record.evolve(state=State.DATASET_CREATED, dataset_id="ds_2")
    assert (later.state, later.dataset_id, later.abandoned_datasets) == (
        State.DATASET_CREATED,
        "ds_2",
        ("ds_1",),
    )
    assert later.updated_at > 0.0 and record.state is State.PENDING  # the original is kept
    assert later == JobRecord(**{**later.__dict__})
    with pytest.raises(TypeError, match="datset_id"):
        record.evolve(datset_id="typo")
