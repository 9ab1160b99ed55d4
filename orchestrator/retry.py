"""One retry policy shape for every kind of waiting, and the one retry loop.

Temporal's shape: initial interval, coefficient, maximum interval, maximum attempts,
plus full jitter; a server's ``Retry-After`` wins when it sends one (capped, so a
hostile value cannot park a job for hours). ``call_with_retries`` is the loop every
retried call goes through: gateway calls, upload restarts. The engine's step retries
and the status polls use the same policy's ``delay`` and ``backoff``; their deadlines
(a phase's, a step's) are the engine's.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from typing import TypeVar

import anyio

from orchestrator.errors import RetryableError


@dataclass(frozen=True)
class RetryPolicy:
    initial: float = 0.5
    coefficient: float = 2.0
    maximum: float = 30.0
    max_attempts: int = 6
    jitter: bool = True
    # A server asking for more than this is treated as this: a hostile Retry-After must
    # not park a job for hours.
    max_retry_after: float = 120.0

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before retry number ``attempt`` (1-based), with full jitter."""
        ceiling = min(self.maximum, self.initial * self.coefficient ** max(0, attempt - 1))
        if not self.jitter:
            return ceiling
        return (rng or random).uniform(0.0, ceiling)

    def delay(
        self, attempt: int, retry_after: float | None, rng: random.Random | None = None
    ) -> float:
        if retry_after is not None:
            return min(max(0.0, retry_after), self.max_retry_after)
        return self.backoff(attempt, rng)


T = TypeVar("T")


async def call_with_retries(
    policy: RetryPolicy,
    call: Callable[[], Awaitable[T]],
    *,
    rng: random.Random | None = None,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """``call()`` until it returns, trying again after a ``RetryableError`` as ``policy``
    says, at most ``policy.max_attempts`` times in all; the last error is raised."""
    attempt = 1
    while True:
        try:
            return await call()
        except RetryableError as exc:
            if attempt >= policy.max_attempts:
                raise
            if on_retry:
                on_retry()
            await anyio.sleep(policy.delay(attempt, exc.retry_after, rng))
            attempt += 1


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from datetime import datetime
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
