"""What a command's start costs: the CLI module imports neither the HTTP stack nor the
manifest parser, so ``status`` reads a state file without paying for them."""

from __future__ import annotations

import subprocess
import sys

LATE = ("aiohttp", "httpx", "pydantic", "yaml", "prometheus_client", "tenacity")


def test_the_cli_module_leaves_heavy_imports_to_the_commands_that_use_them() -> None:
    code = f"import sys, orchestrator.cli; print(' '.join(m for m in {LATE!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


def test_a_run_imports_them_when_it_needs_them() -> None:
    # The check above must be able to fail: the engine does pull the HTTP stack in.
    code = (
        "import sys, orchestrator.cli, orchestrator.engine; "
        f"print(' '.join(m for m in {LATE!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert {"aiohttp", "pydantic"} <= set(out.stdout.split())
