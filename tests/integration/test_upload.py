"""Uploads to the simulator's signed URLs (and once to moto's): exact bytes, never
chunked, never the API key, retries from byte 0, expiry, and the 5 GiB limit."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import aiohttp
import anyio
import pytest
import yarl

from orchestrator.errors import UploadError
from orchestrator.gateway import GatewayClient
from orchestrator.retry import RetryPolicy
from orchestrator.settings import UploadSettings
from orchestrator.simulator import SimulatorThread
from orchestrator.upload import s3_key_from_url, storage_client, upload_dataset
from tests.conftest import write_dataset

pytestmark = pytest.mark.anyio
SETTINGS = UploadSettings(
    block_size=64 * 1024, retry=RetryPolicy(initial=0.01, maximum=0.05, max_attempts=12)
)


async def signed_url(sim: SimulatorThread, name: str = "data.jsonl") -> tuple[str, str]:
    async with GatewayClient(sim.url, sim.simulator.config.api_key) as client:
        created = await client.create_dataset(name, "openai", "gpt-4o-mini")
    return created.id, created.signed_url


def stored(sim: SimulatorThread, key: str) -> bytes:
    path, _, _ = sim.simulator.world.objects[key]
    return path.read_bytes()


async def test_exact_bytes_arrive_and_md5_matches_etag(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    source = tmp_path / "odd name+1.jsonl"
    source.write_bytes(bytes(range(256)) * 3001)  # not a multiple of the block size
    _, url = await signed_url(sim, source.name)
    sent: list[int] = []
    async with storage_client(SETTINGS) as storage:
        result = await upload_dataset(storage, url, source, SETTINGS, progress=sent.append)
    body = source.read_bytes()
    assert result.md5 == hashlib.md5(body).hexdigest() and result.size == len(body)
    assert result.sha256 == hashlib.sha256(body).hexdigest()
    assert result.key == s3_key_from_url(url) and result.key.endswith("/odd name+1.jsonl")
    assert stored(sim, result.key) == body
    assert sum(sent) == len(body) and max(sent) <= SETTINGS.block_size
    journal = sim.journal
    assert journal.storage_chunked == 0
    assert journal.storage_api_key_leaks == 0 and journal.storage_unsigned_amz_headers == 0


async def test_storage_errors_restart_from_byte_zero(sim: SimulatorThread, tmp_path: Path) -> None:
    source = write_dataset(tmp_path / "d.jsonl", examples=2000)
    urls = [(await signed_url(sim, f"d{i}.jsonl"))[1] for i in range(6)]
    sim.simulator.config.update({"storage_error_rate": 0.4})
    attempts = 0
    async with storage_client(SETTINGS) as storage:
        for url in urls:
            progress: list[int] = []
            result = await upload_dataset(storage, url, source, SETTINGS, progress=progress.append)
            attempts += result.attempts
            assert stored(sim, result.key) == source.read_bytes()
            assert sum(progress) == source.stat().st_size  # failed attempts were rewound
    assert attempts > len(urls) and sim.journal.faults["storage_5xx"] == attempts - len(urls)


async def test_expired_url_is_reported_as_expired(sim: SimulatorThread, tmp_path: Path) -> None:
    sim.simulator.config.update({"url_ttl": 1})
    source = write_dataset(tmp_path / "d.jsonl")
    _, url = await signed_url(sim)
    await anyio.sleep(2.1)
    async with storage_client(SETTINGS) as storage:
        with pytest.raises(UploadError) as caught:
            await upload_dataset(storage, url, source, SETTINGS)
    assert caught.value.expired and "Request has expired" in str(caught.value)
    assert "X-Amz-Signature" not in str(caught.value)


async def test_bad_signature_is_permanent(sim: SimulatorThread, tmp_path: Path) -> None:
    source = write_dataset(tmp_path / "d.jsonl")
    _, url = await signed_url(sim)
    tampered = url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    async with storage_client(SETTINGS) as storage:
        with pytest.raises(UploadError) as caught:
            await upload_dataset(storage, tampered, source, SETTINGS)
    assert not caught.value.expired and "SignatureDoesNotMatch" in str(caught.value)
    assert sim.journal.uploads == 0


async def test_chunked_bodies_are_refused_by_the_simulator(sim: SimulatorThread) -> None:
    _, url = await signed_url(sim)

    async def body():  # type: ignore[no-untyped-def]
        yield b'{"messages": []}\n'

    async with (
        aiohttp.ClientSession() as http,
        http.put(yarl.URL(url, encoded=True), data=body()) as response,
    ):
        assert response.status == 411 and b"MissingContentLength" in await response.read()
    assert sim.journal.storage_chunked == 1


async def test_over_5_gib_is_refused_before_any_network_call(
    sim: SimulatorThread, tmp_path: Path
) -> None:
    huge = tmp_path / "huge.jsonl"
    with huge.open("wb") as handle:  # sparse: costs no disk
        handle.truncate(5 * 1024**3 + 1)
    _, url = await signed_url(sim)
    async with storage_client(SETTINGS) as storage:
        with pytest.raises(UploadError, match="over the 5 GiB limit"):
            await upload_dataset(storage, url, huge, SETTINGS)
    assert sim.journal.uploads == 0 and sum(sim.journal.faults.values()) == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def test_upload_to_a_boto3_presigned_url_on_moto(tmp_path: Path) -> None:
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        s3.create_bucket(Bucket="datasets")
        key = "teams/support v1/train+final.jsonl"
        url = s3.generate_presigned_url(
            "put_object", Params={"Bucket": "datasets", "Key": key}, ExpiresIn=600
        )
        source = write_dataset(tmp_path / "train.jsonl", examples=500)
        async with storage_client(SETTINGS) as storage:
            result = await upload_dataset(storage, url, source, SETTINGS)
        assert result.key == key  # derived from the presigned URL, URL-decoded
        body = s3.get_object(Bucket="datasets", Key=key)["Body"].read()
        assert body == source.read_bytes()
    finally:
        server.stop()
