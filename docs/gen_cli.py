"""Writes docs/cli.md from the CLI itself: every command's --help, as `orchestrator
COMMAND --help` prints it. `make docs` runs it; a test fails when the file drifts."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from orchestrator.cli import cli

OUT = Path(__file__).with_name("cli.md")
WIDTH = 100


def render() -> str:
    parts = [
        "# Command reference",
        "",
        "Generated from the CLI by `make docs` (`python docs/gen_cli.py`); do not edit by",
        "hand. Each section is what `orchestrator COMMAND --help` prints.",
        "",
    ]
    root = click.Context(cli, info_name="orchestrator", terminal_width=WIDTH)
    for name in ["", *sorted(cli.list_commands(root))]:
        command = cli if not name else cli.get_command(root, name)
        assert command is not None
        ctx = click.Context(
            command,
            parent=root if name else None,
            info_name=name or "orchestrator",
            terminal_width=WIDTH,
            max_content_width=WIDTH,
        )
        parts.append(f"## `orchestrator {name}`" if name else "## `orchestrator`")
        parts += ["", "```", command.get_help(ctx), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
