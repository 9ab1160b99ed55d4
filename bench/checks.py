"""Local dataset checks: MB/s of the one streaming pass (validate + SHA-256), and its RSS."""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator.datasets import inspect_dataset


def _write(path: Path, megabytes: int) -> None:
    lines = []
    for i in range(2000):  # varied, realistic chat examples of a few hundred bytes to a few KB
        messages = [{"role": "system", "content": "You are a careful support agent."}]
        for turn in range(1 + i % 4):
            messages.append(
                {"role": "user", "content": f"Question {i}.{turn}: " + "why? " * (i % 50)}
            )
            messages.append(
                {"role": "assistant", "content": f"Answer {i}.{turn}: " + "because. " * (i % 70)}
            )
        lines.append(json.dumps({"messages": messages}))
    block = ("\n".join(lines) + "\n").encode()
    with path.open("wb") as handle:
        written = 0
        while written < megabytes * 1_000_000:
            handle.write(block)
            written += len(block)


def run(megabytes: int = 300) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-check-") as tmp:
        path = Path(tmp) / "big.jsonl"
        _write(path, megabytes)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        report = inspect_dataset(path)
        seconds = time.perf_counter() - started
        assert report.ok, report.errors[:3]
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        return {
            "dataset_check_mb_per_s": round(report.size / seconds / 1e6, 1),
            "dataset_check_rss_growth_mib": round(grew, 1),
        }
