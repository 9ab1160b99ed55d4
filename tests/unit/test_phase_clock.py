from __future__ import annotations

import zlib

from orchestrator.lifecycle import JobRun, PhaseClock
from orchestrator.manifest import JobSpec
from orchestrator.states import JobRecord, State


def run_for(name: str, started: float, state: State = State.VALIDATING) -> JobRun:
    spec = JobSpec(
        name=name,
        provider="openai",
        model="m",
        virtual_key="vk",
        hyperparameters={},
        override_model=None,
        dataset_path=None,
        s3_key="k",
    )
    record = JobRecord(name=name, fingerprint="f", state=state, phase_started_at=started)
    return JobRun(spec, record)


def plain_name() -> str:
    return next(
        f"job-{i}" for i in range(100) if zlib.crc32(f"job-{i}".encode()) % PhaseClock.PROBE_EVERY
    )


def probe_name() -> str:
    return next(
        f"job-{i}"
        for i in range(1000)
        if zlib.crc32(f"job-{i}".encode()) % PhaseClock.PROBE_EVERY == 0
    )


def test_nothing_learned_says_nothing() -> None:
    assert PhaseClock().expected_end(run_for("a", 100.0)) is None


def test_a_finished_phase_sets_when_others_poll() -> None:
    clock = PhaseClock()
    assert clock.finished(run_for("a", 100.0), now=107.0) == 7.0
    other = run_for(plain_name(), 200.0)
    assert clock.expected_end(other) == 207.0
    other.last_poll_at = 207.5  # asked after the expected end: the backoff decides now
    assert clock.expected_end(other) is None
    # Training of the same model, or validation of another model, is not known yet.
    assert clock.expected_end(run_for(plain_name(), 200.0, State.TRAINING)) is None


def test_the_estimate_only_shrinks_and_probes_poll_early() -> None:
    clock = PhaseClock()
    clock.finished(run_for("a", 0.0), now=10.0)
    assert clock.finished(run_for("b", 0.0), now=12.0) is None  # longer: ignored
    assert clock.finished(run_for("c", 0.0), now=9.9) is None  # within 2%: not worth a wake
    assert clock.finished(run_for("d", 0.0), now=8.0) == 8.0
    probe = run_for(probe_name(), 0.0)
    assert clock.expected_end(probe) == 8.0 * PhaseClock.PROBE_LEAD
    # Still running when probed: next at the estimate like the others, then the backoff.
    probe.last_poll_at = 8.0 * PhaseClock.PROBE_LEAD + 0.01
    assert clock.expected_end(probe) == 8.0
    probe.last_poll_at = 8.02
    assert clock.expected_end(probe) is None


def test_first_jobs_scout_and_the_rest_wait_for_them() -> None:
    clock = PhaseClock()
    runs = [run_for(f"job-{i}", 0.0) for i in range(PhaseClock.SCOUTS + 2)]
    delays = [clock.poll_delay(run, 2.0) for run in runs]
    assert delays == [2.0] * PhaseClock.SCOUTS + [2.0 * PhaseClock.WAIT_FACTOR] * 2
    assert clock.poll_delay(runs[0], 3.0) == 3.0  # a scout stays a scout
    # Scouts are per phase: the same job is a scout again when training starts.
    assert clock.poll_delay(runs[-1], 2.0, State.TRAINING) == 2.0
