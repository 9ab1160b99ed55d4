"""Upload one file to a signed URL and print the seconds the PUT took (for bench.uploads)."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio

from orchestrator.settings import UploadSettings
from orchestrator.upload import storage_client, upload_dataset


async def main(url: str, path: Path) -> None:
    settings = UploadSettings()
    async with storage_client(settings) as storage:
        result = await upload_dataset(storage, url, path, settings)
    print(f"{result.seconds:.6f} {result.md5}")


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], Path(sys.argv[2]))
