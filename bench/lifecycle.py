"""Makespan of N jobs versus one job through the whole lifecycle, CPU per job, status
GETs per job versus a perfect poller, and gateway requests per CPU-second."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

import yaml

from bench.harness import Measured, cli, measure, orchestrator_env, reference_cpu_s, simulator
from bench.transports import bare_aiohttp_cpu_per_request

# A perfect poller: one GET as validation ends, one as training ends, and the look at a
# created finetune before attaching to it (attaching would reset one found further along).
MINIMUM_GETS_PER_JOB = 3


def _example(i: int) -> str:
    return json.dumps(
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        }
    )


def _manifest(folder: Path, count: int, prefix: str = "job") -> Path:
    jobs = []
    for n in range(count):
        data = folder / f"data/{prefix}-{n:05d}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        lines = (_example(n * 100 + i).replace("question", f"{prefix} question") for i in range(10))
        data.write_text("".join(line + "\n" for line in lines))
        jobs.append({"name": f"{prefix}-{n:05d}", "dataset": str(data)})
    manifest = folder / f"manifest-{prefix}-{count}.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "defaults": {"provider": "openai", "model": "gpt-4o-mini", "virtual_key": "vk"},
                "jobs": jobs,
            }
        )
    )
    return manifest


def run(
    jobs: int = 1000,
    latency: float = 0.02,
    validation: float = 5.0,
    training: float = 10.0,
    repeats: int = 3,
) -> dict[str, Any]:
    """``repeats`` times: 1 job, then ``jobs`` jobs, each on a fresh simulator and state
    file, then ``jobs`` other jobs on that state file (warm: it knows the phase
    durations). The figures are medians, with every run's CPU shown: this machine's speed
    drifts by 10% or more between runs."""
    results: dict[str, Any] = {}
    flags = [
        "--latency",
        str(latency),
        "--validation-seconds",
        str(validation),
        "--training-seconds",
        str(training),
        "--queue-seconds",
        "0",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-life-") as tmp:
        folder = Path(tmp)
        manifests = {count: _manifest(folder / str(count), count) for count in (1, jobs)}
        warm_manifest = _manifest(folder / "warm", jobs, prefix="warm")

        def measured_run(manifest: Path, state: Path) -> tuple[Measured, dict[str, Any]]:
            with simulator(*flags) as sim:
                measured = measure(
                    cli("run", str(manifest), "--state", str(state)), env=orchestrator_env(sim)
                )
                journal = sim.journal()
            assert measured.code == 0, measured.stderr[-3000:]
            return measured, journal

        one: list[Measured] = []
        many: list[Measured] = []
        warm: list[Measured] = []
        gets, warm_gets, requests = [], [], []
        references: list[float] = []
        bare: list[float] = []  # aiohttp alone: CPU per request, beside each run
        # Interleaved, so a drift of the machine's speed touches every kind of run alike.
        for repeat in range(repeats):
            state = folder / f"state-{repeat}.db"
            references.append(reference_cpu_s())
            with simulator(*flags) as sim:
                bare.append(bare_aiohttp_cpu_per_request(sim.url))
            one.append(measured_run(manifests[1], folder / f"state-1-{repeat}.db")[0])
            measured, journal = measured_run(manifests[jobs], state)
            many.append(measured)
            gets.append(journal["requests"].get("get_finetune", 0))
            requests.append(sum(journal["requests"].values()) + sum(journal["faults"].values()))
            # The same batch again on that state file, which has learned the phase durations.
            measured, journal = measured_run(warm_manifest, state)
            warm.append(measured)
            warm_gets.append(journal["requests"].get("get_finetune", 0))

        def runs(measured: list[Measured]) -> str:
            return " ".join(f"{1000 * m.cpu / jobs:.2f}" for m in measured)

        both = list(zip(one, many, strict=True))
        results["makespan_1_job_s"] = round(median(m.wall for m in one), 2)
        results[f"makespan_{jobs}_jobs_s"] = round(median(m.wall for m in many), 2)
        results["makespan_ratio"] = round(median(b.wall / a.wall for a, b in both), 3)
        results["cpu_ms_per_job"] = round(1000 * median(m.cpu for m in many) / jobs, 2)
        results["cpu_ms_per_job_runs"] = runs(many)
        # Without the fixed cost of a process (interpreter, imports), which the 1-job run
        # measures: what each further job costs.
        results["cpu_ms_per_additional_job"] = round(
            1000 * median((b.cpu - a.cpu) / (jobs - 1) for a, b in both), 2
        )
        results["cpu_s_1_job"] = round(median(m.cpu for m in one), 2)
        results["status_gets_per_job"] = round(median(gets) / jobs, 2)
        results["polls_vs_minimum"] = round(median(gets) / jobs / MINIMUM_GETS_PER_JOB, 2)
        results["requests_per_cpu_second"] = round(
            median(r / m.cpu for r, m in zip(requests, many, strict=True)), 0
        )
        # The figure to watch: the orchestrator's CPU for its requests, divided by what
        # aiohttp alone spends on as many requests, measured minutes apart in this run.
        # Milliseconds move with this machine's speed; the ratio much less.
        results["cpu_vs_bare_aiohttp"] = round(
            median(m.cpu / (r * b) for m, r, b in zip(many, requests, bare, strict=True)),
            2,
        )
        results["bare_aiohttp_us_per_request_runs"] = " ".join(f"{b * 1e6:.0f}" for b in bare)
        results["orchestrator_peak_rss_mib"] = round(max(m.peak_rss_mib for m in many), 1)
        results[f"makespan_{jobs}_jobs_warm_s"] = round(median(m.wall for m in warm), 2)
        results["status_gets_per_job_warm"] = round(median(warm_gets) / jobs, 2)
        results["polls_vs_minimum_warm"] = round(median(warm_gets) / jobs / MINIMUM_GETS_PER_JOB, 2)
        results["cpu_ms_per_job_warm"] = round(1000 * median(m.cpu for m in warm) / jobs, 2)
        results["cpu_ms_per_job_warm_runs"] = runs(warm)
        results["reference_cpu_ms_runs"] = " ".join(f"{1000 * r:.0f}" for r in references)
    return results
