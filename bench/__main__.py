"""`make bench`: every figure beside its target, measured in one run; JSON in bench-results/."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from bench import (
    checks,
    lifecycle,
    parts,
    pg_drivers,
    resume,
    soak,
    store,
    transports,
    uploads,
    workers,
)

# (key, target, "max" when lower is better / "min" when higher is better, unit)
TARGETS = [
    ("makespan_ratio", 1.10, "max", "x  (N jobs / 1 job)"),
    ("cpu_vs_bare_aiohttp", 2.5, "max", "x  CPU vs aiohttp alone making as many requests"),
    ("cpu_ms_per_job", 5.0, "max", "ms CPU per job (moves with the machine's speed)"),
    ("cpu_ms_per_job_warm", 5.0, "max", "ms CPU per job, warm"),
    ("polls_vs_minimum", 1.5, "max", "x  status GETs vs a perfect poller, cold"),
    ("polls_vs_minimum_warm", 1.5, "max", "x  status GETs vs a perfect poller, warm"),
    ("store_transitions_per_s", 5000, "min", "transitions/s"),
    ("pg_store_transitions_per_s", 5000, "min", "transitions/s, PostgreSQL"),
    ("resume_first_transition_s", 1.0, "max", "s to the first resumed transition"),
    ("upload_vs_curl", 0.9, "min", "x  upload throughput vs curl -T"),
    ("parts_upload_vs_curl", 0.9, "min", "x  /v1/uploads parts vs curl posting them"),
    ("parts_peak_rss_mib_1gib", 100, "max", "MiB peak RSS sending 1 GiB in parts"),
    ("dataset_check_mb_per_s", 100, "min", "MB/s local dataset checks"),
    ("peak_rss_mib_1gib", 100, "max", "MiB peak RSS uploading 1 GiB"),
    ("peak_rss_mib_4gib", 100, "max", "MiB peak RSS uploading 4 GiB"),
    ("soak_rss_growth", 1.05, "max", "x  daemon RSS after the last wave / after the first"),
]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="cold lifecycle runs (median)")
    parser.add_argument("--upload-gib", type=float, default=1.0)
    parser.add_argument(
        "--only",
        choices=[
            "checks",
            "uploads",
            "parts",
            "lifecycle",
            "store",
            "pg_drivers",
            "workers",
            "resume",
            "transports",
            "soak",
        ],
    )
    args = parser.parse_args()
    results: dict[str, Any] = {}
    started = time.time()
    suites = {
        "checks": lambda: checks.run(),
        "store": lambda: store.run(),
        "pg_drivers": lambda: pg_drivers.run(),
        "workers": lambda: workers.run(),
        "transports": lambda: transports.run(),
        "resume": lambda: resume.run(),
        "lifecycle": lambda: lifecycle.run(jobs=args.jobs, repeats=args.repeats),
        "uploads": lambda: uploads.run(size=int(args.upload_gib * 1024**3)),
        "parts": lambda: parts.run(size=int(args.upload_gib * 1024**3)),
        "soak": lambda: soak.run(),
    }
    for name, suite in suites.items():
        if args.only and args.only != name:
            continue
        print(f"running {name} ...", flush=True)
        results.update(suite())
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "seconds": round(time.time() - started, 1),
    }
    print()
    print(f"{'figure':<28} {'measured':>12} {'target':>10}  {'':4} unit")
    for key, target, sense, unit in TARGETS:
        if key not in results:
            continue
        value = results[key]
        ok = value <= target if sense == "max" else value >= target
        bound = f"<= {target}" if sense == "max" else f">= {target}"
        print(f"{key:<28} {value:>12} {bound:>10}  {'ok' if ok else 'MISS':4} {unit}")
    shown = {k for k, *_ in TARGETS} | {"machine"}
    for key, value in results.items():
        if key not in shown:
            print(f"{key:<28} {value:>12}")
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {out / 'latest.json'}")


if __name__ == "__main__":
    main()
