"""Fixtures the acceptance tests share."""

from tests.acceptance.test_daemon import daemon  # noqa: F401  (a daemon process, stopped after)
