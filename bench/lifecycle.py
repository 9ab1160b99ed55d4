"""Makespan of N jobs versus one job through the whole lifecycle, CPU per job, status
GETs per job versus a perfect poller, and gateway requests per CPU-second."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

import yaml

from bench.harness import cli, measure, orchestrator_env, simulator

MINIMUM_GETS_PER_JOB = 2  # a perfect poller: one GET as validation ends, one as training ends


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
    """The cold pair (1 job, then ``jobs`` jobs) ``repeats`` times, each on a fresh
    simulator and state file: the figures are medians, with every run's CPU shown, since
    this machine's speed drifts by 10% or more between runs. Then a warm batch on each
    of those state files."""
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
        pairs = []
        for repeat in range(repeats):
            runs = {}
            for count, manifest in manifests.items():
                state = folder / f"state-{count}-{repeat}.db"
                with simulator(*flags) as sim:
                    measured = measure(
                        cli("run", str(manifest), "--state", str(state)),
                        env=orchestrator_env(sim),
                    )
                    journal = sim.journal()
                assert measured.code == 0, measured.stderr[-3000:]
                requests = sum(journal["requests"].values()) + sum(journal["faults"].values())
                runs[count] = (measured, journal["requests"].get("get_finetune", 0), requests)
            pairs.append(runs)
        one = [pair[1][0] for pair in pairs]
        many = [pair[jobs][0] for pair in pairs]
        both = list(zip(one, many, strict=True))
        results["makespan_1_job_s"] = round(median(m.wall for m in one), 2)
        results[f"makespan_{jobs}_jobs_s"] = round(median(m.wall for m in many), 2)
        results["makespan_ratio"] = round(median(b.wall / a.wall for a, b in both), 3)
        results["cpu_ms_per_job"] = round(1000 * median(m.cpu for m in many) / jobs, 2)
        results["cpu_ms_per_job_runs"] = " ".join(f"{1000 * m.cpu / jobs:.2f}" for m in many)
        # Without the fixed cost of a process (interpreter, imports), which the 1-job run
        # measures: what each further job costs.
        results["cpu_ms_per_additional_job"] = round(
            1000 * median((b.cpu - a.cpu) / (jobs - 1) for a, b in both), 2
        )
        results["cpu_s_1_job"] = round(median(m.cpu for m in one), 2)
        gets = median(pair[jobs][1] for pair in pairs) / jobs
        results["status_gets_per_job"] = round(gets, 2)
        results["polls_vs_minimum"] = round(gets / MINIMUM_GETS_PER_JOB, 2)
        results["requests_per_cpu_second"] = round(
            median(pair[jobs][2] / pair[jobs][0].cpu for pair in pairs), 0
        )
        results["orchestrator_peak_rss_mib"] = round(max(m.peak_rss_mib for m in many), 1)

        # The same batch again on each state file, which has learned the phase durations.
        manifest = _manifest(folder / "warm", jobs, prefix="warm")
        warm_runs = []
        for repeat in range(repeats):
            with simulator(*flags) as sim:
                warm = measure(
                    cli("run", str(manifest), "--state", str(folder / f"state-{jobs}-{repeat}.db")),
                    env=orchestrator_env(sim),
                )
                journal = sim.journal()
            assert warm.code == 0, warm.stderr[-3000:]
            warm_runs.append((warm, journal["requests"].get("get_finetune", 0)))
        warm_gets = median(gets for _, gets in warm_runs) / jobs
        results[f"makespan_{jobs}_jobs_warm_s"] = round(median(m.wall for m, _ in warm_runs), 2)
        results["status_gets_per_job_warm"] = round(warm_gets, 2)
        results["polls_vs_minimum_warm"] = round(warm_gets / MINIMUM_GETS_PER_JOB, 2)
        results["cpu_ms_per_job_warm"] = round(1000 * median(m.cpu for m, _ in warm_runs) / jobs, 2)
        results["cpu_ms_per_job_warm_runs"] = " ".join(
            f"{1000 * m.cpu / jobs:.2f}" for m, _ in warm_runs
        )
    return results
