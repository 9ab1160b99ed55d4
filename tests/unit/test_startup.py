"""What a command's start costs: the CLI module imports neither the HTTP stack nor the
manifest parser, so ``status`` reads a state file without paying for them."""

from __future__ import annotations

import subprocess
import sys

LATE = ("aiohttp", "pydantic", "yaml", "prometheus_client")


def _late_imports_after(*modules: str) -> set[str]:
    """Which of ``LATE`` a fresh interpreter has imported once it imported ``modules``."""
    code = (
        f"import sys, {', '.join(modules)}; "
        f"print(' '.join(m for m in {LATE!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_cli_module_leaves_heavy_imports_to_the_commands_that_use_them() -> None:
    assert _late_imports_after("orchestrator.cli") == set()


def test_a_run_imports_them_when_it_needs_them() -> None:
    # The check above must be able to fail: the engine does pull the HTTP stack in.
    assert {"aiohttp", "pydantic"} <= _late_imports_after("orchestrator.cli", "orchestrator.engine")
