"""pyproject.toml declares what the package imports, and nothing else."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]
# Distribution name -> the module it is imported as, where the two differ.
MODULE = {"pyyaml": "yaml", "prometheus-client": "prometheus_client"}
# Loaded by name rather than by an import statement.
BY_NAME = {"uvloop": "use_uvloop"}


def _runtime_dependencies() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [re.split(r"[<>=;\[ ]", spec, maxsplit=1)[0].lower() for spec in project["dependencies"]]


def test_every_runtime_dependency_is_used_by_the_package() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "orchestrator").rglob("*.py"))
    for name in _runtime_dependencies():
        if name in BY_NAME:
            assert BY_NAME[name] in source, name
            continue
        module = MODULE.get(name, name)
        assert re.search(rf"^\s*(import|from) {module}\b", source, re.M), f"{name} is unused"


def test_no_second_http_stack_or_file_library() -> None:
    assert not {"httpx", "httpx-aiohttp", "sniffio", "aiofiles", "tenacity"} & set(
        _runtime_dependencies()
    )
