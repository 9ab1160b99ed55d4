"""One retry policy shape for every kind of waiting: API retries, upload restarts, polling.

Temporal's shape: initial interval, coefficient, maximum interval, maximum attempts,
plus full jitter; a server's ``Retry-After`` wins when it sends one. Retry loops
themselves are tenacity's, entered after a first attempt that failed
(``call_with_retries``); this module decides how long to wait.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from orchestrator.errors import RetryableError

if TYPE_CHECKING:
    import tenacity


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

    def tenacity_kwargs(
        self,
        *,
        retry_on: Callable[[BaseException], bool] | None = None,
        rng: random.Random | None = None,
        before_sleep: Callable[[tenacity.RetryCallState], Any] | None = None,
        attempts_made: int = 0,
    ) -> dict[str, Any]:
        """Arguments for ``tenacity.AsyncRetrying`` that follow this policy, counting
        ``attempts_made`` before tenacity took over."""
        import tenacity  # here: a run whose calls all succeed at once never needs it

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            retry_after = exc.retry_after if isinstance(exc, RetryableError) else None
            return self.delay(state.attempt_number + attempts_made, retry_after, rng)

        predicate = retry_on or (lambda exc: isinstance(exc, RetryableError))
        return {
            "stop": tenacity.stop_after_attempt(max(1, self.max_attempts - attempts_made)),
            "wait": wait,
            "retry": tenacity.retry_if_exception(predicate),
            "reraise": True,
            "before_sleep": before_sleep,
        }


T = TypeVar("T")


async def call_with_retries(
    policy: RetryPolicy,
    call: Callable[[], Awaitable[T]],
    *,
    rng: random.Random | None = None,
    on_retry: Callable[[], None] | None = None,
) -> T:
    """``call()`` until it returns, trying again after a ``RetryableError`` as ``policy``
    says. The first attempt runs outside tenacity: nearly every call succeeds at once,
    and a retry loop per call was a measurable share of a big batch's CPU."""
    try:
        return await call()
    except RetryableError as exc:
        if policy.max_attempts <= 1:
            raise
        if on_retry:
            on_retry()
        await anyio.sleep(policy.delay(1, exc.retry_after, rng))

    import tenacity  # here, not at start: most runs never retry a call

    def before_sleep(_: tenacity.RetryCallState) -> None:
        if on_retry:
            on_retry()

    async for attempt in tenacity.AsyncRetrying(
        **policy.tenacity_kwargs(rng=rng, before_sleep=before_sleep, attempts_made=1)
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover


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
