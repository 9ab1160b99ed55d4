"""Upload throughput versus `curl -T` on the same server, and peak RSS by file size."""

from __future__ import annotations

import hashlib
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio

from bench.harness import API_KEY, measure, simulator, write_file
from orchestrator.gateway import GatewayClient

GIB = 1024**3


async def _signed_urls(url: str, count: int) -> list[str]:
    async with GatewayClient(url, API_KEY) as client:
        return [
            (await client.create_dataset(f"bench-{i}.bin", "openai", "m")).signed_url
            for i in range(count)
        ]


def _ours(url: str, path: Path) -> tuple[float, str]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.upload_child", url, str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds, md5 = out.stdout.split()
    return float(seconds), md5


def _curl(url: str, path: Path) -> tuple[float, str]:
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-T",
            str(path),
            url,
            "-o",
            "/dev/null",
            "-D",
            "-",
            "-w",
            "\n%{time_total}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = out.stdout.strip().splitlines()
    etag = next(
        line.split(":", 1)[1].strip().strip('"')
        for line in lines
        if line.lower().startswith("etag:")
    )
    return float(lines[-1]), etag


def run(
    size: int = GIB, rounds: int = 3, rss_sizes: tuple[int, ...] = (GIB, 4 * GIB)
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp, simulator() as sim:
        source = write_file(Path(tmp) / "data.bin", size)
        md5 = hashlib.md5(source.read_bytes()).hexdigest() if size <= GIB else None
        urls = anyio.run(_signed_urls, sim.url, 2 * rounds)
        ours, curls = [], []
        for i in range(rounds):  # interleaved, so both see the same machine state
            seconds, ours_md5 = _ours(urls[2 * i], source)
            ours.append(seconds)
            seconds, curl_md5 = _curl(urls[2 * i + 1], source)
            curls.append(seconds)
            if md5:
                assert ours_md5 == md5 == curl_md5, "bytes differ"
        ours_mbs = size / statistics.median(ours) / 1e6
        curl_mbs = size / statistics.median(curls) / 1e6
        results["upload_mb_per_s"] = round(ours_mbs, 1)
        results["curl_mb_per_s"] = round(curl_mbs, 1)
        results["upload_vs_curl"] = round(ours_mbs / curl_mbs, 3)
        source.unlink()
        for rss_size in rss_sizes:
            sparse = write_file(Path(tmp) / f"rss-{rss_size}.bin", rss_size, sparse=True)
            url = anyio.run(_signed_urls, sim.url, 1)[0]
            measured = measure([sys.executable, "-m", "bench.upload_child", url, str(sparse)])
            assert measured.code == 0, measured.stderr
            results[f"peak_rss_mib_{rss_size // GIB}gib"] = round(measured.peak_rss_mib, 1)
            sparse.unlink()
    return results
