"""Every option says what it does, and docs/cli.md is what the CLI prints."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from orchestrator.cli import cli

ROOT = Path(__file__).parents[2]


def test_every_option_of_every_command_has_help() -> None:
    ctx = click.Context(cli)
    missing = [
        f"{name} {param.opts[0]}"
        for name in cli.list_commands(ctx)
        if (command := cli.get_command(ctx, name)) is not None
        for param in command.params
        if isinstance(param, click.Option) and not param.help
    ]
    assert missing == []


def test_docs_cli_md_matches_the_cli() -> None:
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "cli.md").read_text() == gen.render(), "run `make docs`"
