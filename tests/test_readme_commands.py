"""Every `pdctl` command line that the README and the docs show in a shell block parses with the CLI's own
parser (nothing runs), so an example cannot drift from the CLI."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from pdctl.cli import app, expand_multi_value
from tests.docpages import ROOT, lines, pages

SHELLS = ("bash", "sh", "console", "shell")


def shown_commands() -> list[tuple[str, str]]:
    """(where, command) for each `pdctl ...` in a shell block of README.md and docs/**/*.md."""
    found = []
    for path in pages():
        for number, line, language in lines(path.read_text().replace("\\\n", " ")):
            if language not in SHELLS:
                continue
            for part in shlex.split(line, comments=True) and _commands(line):
                found.append((f"{path.relative_to(ROOT)}:{number}", part))
    return found


def _commands(line: str) -> list[str]:
    parts = [part.strip() for part in line.split("#", 1)[0].split("&&")]
    return [part for part in parts if part.startswith("pdctl ")]


def parse(command: str) -> None:
    """Resolve the command and parse its options as the CLI would, without invoking anything."""
    args = expand_multi_value(shlex.split(command)[1:])
    # Typer's own copy of click's classes: a group is what resolves subcommands.
    command_: Any = typer.main.get_command(app)
    context = command_.make_context("pdctl", args)
    rest = _unparsed(context)
    while hasattr(command_, "resolve_command") and rest:
        name, command_, rest = command_.resolve_command(context, rest)
        assert command_ is not None, f"no command {name!r}"
        context = command_.make_context(name, rest, parent=context)
        rest = _unparsed(context) if hasattr(command_, "resolve_command") else []
    assert not hasattr(command_, "resolve_command"), f"{command!r} names no command"
    # A value taken for a file is a file name: `tpot:50` read as the profile is the drift this test exists for.
    for name, value in context.params.items():
        assert not isinstance(value, Path) or any(c in str(value) for c in "./"), f"{name}: {value!r} is no file"


def _unparsed(context: Any) -> list[str]:
    """A group's arguments left for its subcommand (click 8.2 keeps the first ones apart, as it always did)."""
    protected = getattr(context, "_protected_args", None) or getattr(context, "protected_args", [])
    return [*protected, *context.args]


COMMANDS = shown_commands()


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 5
    assert any("--goodput ttft:2000 tpot:200" in command for _, command in COMMANDS)


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_a_shown_command_parses(where: str, command: str):
    parse(command)


def test_goodput_takes_several_values_after_one_flag():
    assert expand_multi_value(["bench", "--url", "u", "--goodput", "ttft:500", "tpot:50", "-n", "4"]) == [
        "bench", "--url", "u", "--goodput", "ttft:500", "--goodput", "tpot:50", "-n", "4",
    ]  # fmt: skip
    # A profile argument after the values is still the profile.
    assert expand_multi_value(["bench", "--goodput", "ttft:500", "p.yaml"]) == [
        "bench",
        "--goodput",
        "ttft:500",
        "p.yaml",
    ]
