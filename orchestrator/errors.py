"""The exception tree callers catch at the level they care about.

``OrchestratorError``
  ``InputError``            bad manifest or dataset: exit 2, nothing sent
    ``GatewayUnreachable``  the preflight reached no gateway
  ``GatewayError``          anything the gateway or storage host answered badly
    ``RetryableError``      429, 5xx, timeouts, dropped connections: try again later
      ``UnreadableAnswer``  an answer we could not read: not a verdict, look again
    ``PermanentError``      400/401/403/404/409/422, ``success: false``: do not retry
      ``AuthError``         401/403 from the gateway
      ``NotFoundError``     404
      ``ConflictError``     409: the call is out of order for the object's state
  ``UploadError``           the storage host refused or corrupted an upload
  ``StoreError``            the state file cannot be read or written
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of every error this package raises on purpose."""


class InputError(OrchestratorError):
    """Malformed user input (manifest, dataset, flags). Rendered as one line, exit 2."""


class GatewayUnreachable(InputError):
    """The preflight found no gateway answering at the URL (it may come back)."""


class StateLockedError(OrchestratorError):
    """Another engine owns the state file."""


class GatewayError(OrchestratorError):
    """A call to the gateway (or storage host) did not succeed.

    ``endpoint`` is the logical call (``create_dataset``), never a URL with a query string,
    and the message never contains the API key: the client scrubs it before raising.
    """

    def __init__(self, endpoint: str, message: str, status: int | None = None) -> None:
        self.endpoint = endpoint
        self.status = status
        self.message = message
        where = f"{endpoint}: HTTP {status}" if status is not None else endpoint
        super().__init__(f"{where}: {message}")


class RetryableError(GatewayError):
    """Worth trying again: rate limits, server errors, timeouts, dropped connections."""

    def __init__(
        self,
        endpoint: str,
        message: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(endpoint, message, status)
        self.retry_after = retry_after


class UnreadableAnswer(RetryableError):
    """An HTTP answer came back, but not one we can read (HTML, truncated JSON,
    ``success: false`` with a 2xx status, a missing field). It says nothing about the
    object: the call's outcome is unknown, and the object is observed again."""


class PermanentError(GatewayError):
    """Trying again with the same request cannot help."""


class AuthError(PermanentError):
    """The gateway refused the API key."""


class NotFoundError(PermanentError):
    """The object does not exist on the gateway."""


class ConflictError(PermanentError):
    """The call is out of order for the object's current state."""


class UploadError(OrchestratorError):
    """An upload to the signed URL failed in a way retrying the same URL cannot fix."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


class StoreError(OrchestratorError):
    """The state file (or database) failed: the message names it and the OS error."""


class LeaseLost(OrchestratorError):
    """Another worker holds this job's lease now: this process must not write it, nor
    act for it (a shared store's fencing). Not a store failure: only this job stops."""


def permanent_for_status(status: int) -> type[PermanentError]:
    """The most specific permanent error class for an HTTP status."""
    if status in (401, 403):
        return AuthError
    if status == 404:
        return NotFoundError
    if status == 409:
        return ConflictError
    return PermanentError


def retryable_status(status: int) -> bool:
    """Rate limits, timeouts and every 5xx: the server may do better next time."""
    return status >= 500 or status in (408, 425, 429)
