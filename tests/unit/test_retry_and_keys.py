from __future__ import annotations

import random
import time

import pytest

from orchestrator.errors import PermanentError, RetryableError, UploadError
from orchestrator.retry import RetryPolicy, call_with_retries, parse_retry_after
from orchestrator.upload import redact_url, s3_key_from_url


def test_backoff_grows_to_the_cap_with_full_jitter() -> None:
    policy = RetryPolicy(initial=1.0, coefficient=2.0, maximum=8.0, jitter=False)
    assert [policy.backoff(n) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
    jittered = RetryPolicy(initial=1.0, coefficient=2.0, maximum=8.0)
    rng = random.Random(3)
    samples = [jittered.backoff(4, rng) for _ in range(500)]
    assert all(0 <= s <= 8 for s in samples)
    assert min(samples) < 1 and max(samples) > 7  # spread over the whole range


def test_retry_after_wins_but_is_capped() -> None:
    policy = RetryPolicy(initial=1.0, max_retry_after=30)
    assert policy.delay(1, 5.0) == 5.0
    assert policy.delay(1, 3600.0) == 30


def test_parse_retry_after() -> None:
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


@pytest.mark.parametrize(
    ("url", "key"),
    [
        (
            "https://my-bucket.s3.us-east-1.amazonaws.com/datasets/a%20b.jsonl?X-Amz-Signature=x",
            "datasets/a b.jsonl",
        ),
        ("https://my.dotted.bucket.s3.amazonaws.com/k/v.jsonl?X-Amz-Expires=1", "k/v.jsonl"),
        ("https://bucket.s3-accelerate.amazonaws.com/x.jsonl", "x.jsonl"),
        (
            "https://s3.eu-west-1.amazonaws.com/my-bucket/datasets/x%2By.jsonl?X-Amz-Date=1",
            "datasets/x+y.jsonl",
        ),
        (
            "http://127.0.0.1:9000/finetune-datasets/datasets/ds_1/train.jsonl?sig=1",
            "datasets/ds_1/train.jsonl",
        ),
        ("http://localhost:4566/bucket/nested/deep/file.jsonl", "nested/deep/file.jsonl"),
    ],
)
def test_s3_key_from_both_url_styles(url: str, key: str) -> None:
    assert s3_key_from_url(url) == key


def test_url_without_key_is_an_error() -> None:
    with pytest.raises(UploadError):
        s3_key_from_url("http://127.0.0.1:9000/bucket-only?X-Amz-Signature=secret")


def test_redact_url_drops_the_signature() -> None:
    shown = redact_url("https://b.s3.amazonaws.com/k?X-Amz-Signature=abcd&X-Amz-Credential=AKIA")
    assert "abcd" not in shown and "AKIA" not in shown and shown.startswith("https://b.s3")


class Flaky:
    """Fails with ``errors`` in turn, then answers "done"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls: list[float] = []

    async def __call__(self) -> str:
        self.calls.append(time.monotonic())
        if self.errors:
            raise self.errors.pop(0)
        return "done"


@pytest.mark.anyio
async def test_call_with_retries_counts_attempts_and_waits_between_them() -> None:
    policy = RetryPolicy(initial=0.02, coefficient=2.0, maximum=1.0, max_attempts=4, jitter=False)
    retried: list[int] = []
    flaky = Flaky(RetryableError("x", "busy"), RetryableError("x", "busy", 429, retry_after=0.1))
    assert await call_with_retries(policy, flaky, on_retry=lambda: retried.append(1)) == "done"
    assert len(flaky.calls) == 3 and len(retried) == 2
    first_wait, second_wait = (b - a for a, b in zip(flaky.calls, flaky.calls[1:], strict=False))
    assert first_wait >= 0.02 and second_wait >= 0.1  # the backoff, then the Retry-After

    exhausted = Flaky(*(RetryableError("x", "busy") for _ in range(9)))
    with pytest.raises(RetryableError):
        await call_with_retries(policy, exhausted)
    assert len(exhausted.calls) == policy.max_attempts

    permanent = Flaky(PermanentError("x", "no", 400))
    with pytest.raises(PermanentError):
        await call_with_retries(policy, permanent)
    assert len(permanent.calls) == 1
