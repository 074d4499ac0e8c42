"""Every command and group has help text, and `--help` works everywhere."""

import click
import pytest
import typer.main
from typer.testing import CliRunner

from omnicrm.cli import app


def walk(command: click.Command, path: tuple[str, ...] = ()):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from walk(sub, (*path, name))


COMMANDS = list(walk(typer.main.get_command(app)))


def test_the_tree_has_the_foundation_commands():
    paths = {" ".join(p) for p, _ in COMMANDS}
    assert {"init", "version", "contacts add", "contacts show", "contacts update", "contacts delete",
            "contacts list", "contacts note", "contacts timeline", "tags list", "tags rename"} <= paths


@pytest.mark.parametrize("path, command", COMMANDS, ids=[" ".join(p) or "omnicrm" for p, _ in COMMANDS])
def test_every_command_has_help(path, command):
    assert (command.help or "").strip(), f"`omnicrm {' '.join(path)}` has no help text"
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout


def test_root_help_lists_the_sub_apps():
    out = CliRunner().invoke(app, ["--help"]).stdout
    for flag in ("--db", "--user", "--format", "--region", "--quiet", "--verbose", "--log-json", "--version"):
        assert flag in out
    for group in ("contacts", "tags", "init", "version"):
        assert group in out
