"""A 1 GiB file through the Uploads API (/v1/uploads, 64 MB parts, complete) against
curl posting the same parts to the same simulator, and the sender's peak RSS."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench.harness import API_KEY, measure, simulator, write_file
from orchestrator.openai_api import PART_BYTES, FineTuningClient

GIB = 1024**3


def _split(source: Path, folder: Path) -> list[Path]:
    parts = []
    with source.open("rb") as handle:
        while block := handle.read(PART_BYTES):
            part = folder / f"part-{len(parts):03d}"
            part.write_bytes(block)
            parts.append(part)
    return parts


async def _create_upload(url: str, size: int) -> str:
    async with FineTuningClient(url, API_KEY, auth="bearer") as client:
        return (await client.create_upload("curl.bin", size, None)).id


def _curl(url: str, parts: list[Path], size: int) -> float:
    upload_id = anyio.run(_create_upload, url, size)
    started = time.perf_counter()
    for part in parts:
        subprocess.run(
            [
                "curl",
                "-sS",
                "-f",
                "-o",
                "/dev/null",
                "-H",
                f"Authorization: Bearer {API_KEY}",
                "-F",
                f"data=@{part}",
                f"{url}/v1/uploads/{upload_id}/parts",
            ],
            check=True,
        )
    return time.perf_counter() - started


def run(size: int = GIB, rounds: int = 2) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-parts-") as tmp, simulator() as sim:
        folder = Path(tmp)
        source = write_file(folder / "data.bin", size)
        parts = _split(source, folder)
        ours, curls, rss = [], [], []
        for _ in range(rounds):  # interleaved, so both see the same machine state
            measured = measure([sys.executable, "-m", "bench.parts_child", sim.url, str(source)])
            assert measured.code == 0, measured.stderr[-2000:]
            # From the upload's creation to its completion, as curl's time is its parts'.
            ours.append(size / float(measured.stdout.splitlines()[-1].split()[0]) / 1e6)
            rss.append(measured.peak_rss_mib)
            curls.append(size / _curl(sim.url, parts, size) / 1e6)
    return {
        "parts_upload_mb_per_s": round(statistics.median(ours), 1),
        "parts_curl_mb_per_s": round(statistics.median(curls), 1),
        "parts_upload_vs_curl": round(statistics.median(ours) / statistics.median(curls), 3),
        "parts_peak_rss_mib_1gib": round(max(rss), 1),
    }
