"""The README's command and settings tables say what the code does: every ``shopkpi`` command and option of the
parser is in the command table and nothing else is; every settings field is in the settings table with its
environment variable and its default, and nothing else is (issue 11, item 4)."""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Iterator
from dataclasses import MISSING, Field, fields
from pathlib import Path

import pytest

from processor.settings import Settings
from shopkpi.cli import build_parser

README = (Path(__file__).parents[1] / "README.md").read_text()


def section(title: str) -> str:
    """The README's text under ``## title``, up to the next section."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every table row of ``text`` (header and separator rows left out)."""
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("|")
    ]
    return [r for r in rows if not set(r[0]) <= set("-: ")][1:] if rows else []


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def parser_commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], set[str]]]:
    """Every runnable command of the parser (``("kpis", "daily")``), with its options."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs and path:
        yield path, _options(parser)
    for sub in subs:
        for name, child in sub.choices.items():
            yield from parser_commands(child, (*path, name))


def readme_commands() -> dict[tuple[str, ...], set[str]]:
    """Every ``shopkpi ...`` synopsis in the command table: its command words and its options."""
    found: dict[tuple[str, ...], set[str]] = {}
    for row in table_rows(section("Commands").split("\nGlobal options")[0]):
        for synopsis in re.findall(r"`shopkpi ([^`]*)`", row[0]):
            words = re.match(r"(?:[a-z]+(?: |$))*", synopsis)  # the command words, before any argument
            path = tuple(words[0].split()) if words else ()
            assert path not in found, f"shopkpi {' '.join(path)} is in the command table twice"
            found[path] = set(re.findall(r"--[a-z][a-z-]*", synopsis))
    return found


def test_the_command_table_lists_every_command_and_option_of_the_parser_and_nothing_else() -> None:
    parsed = dict(parser_commands(build_parser()))
    documented = readme_commands()
    assert sorted(documented) == sorted(parsed), "commands in the README's table differ from the parser's"
    for path, options in parsed.items():
        assert documented[path] == options, f"options of `shopkpi {' '.join(path)}` in the README's table"


def test_the_global_options_are_documented() -> None:
    line = section("Commands").split("\nGlobal options", 1)[1].split("\n\n")[0]
    assert set(re.findall(r"--[a-z][a-z-]*", line)) - {"--help"} == _options(build_parser())


ENV_ALIASES = {"region": ("AWS_REGION", "AWS_DEFAULT_REGION")}  # the standard AWS variables, both read
FROM_THE_STACK = ("unset", "from the stack")


def settings_table() -> dict[str, str]:
    """Environment variable -> the default written in the settings table."""
    out: dict[str, str] = {}
    for names, default, _ in table_rows(section("Settings")):
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", names):
            assert name not in out, f"{name} is in the settings table twice"
            out[name] = default.strip("`")
    return out


def env_names(f: Field[object]) -> tuple[str, ...]:
    return ENV_ALIASES.get(f.name, (f.metadata["env"],))


def test_the_settings_table_lists_every_setting_and_nothing_else() -> None:
    documented = set(settings_table())
    expected = {n for f in fields(Settings) for n in env_names(f)}
    assert documented == expected


@pytest.mark.parametrize("field", fields(Settings), ids=lambda f: f.name)
def test_each_settings_default_is_the_one_documented(field: Field[object]) -> None:
    table = settings_table()
    default = field.default
    assert default is not MISSING
    for name in env_names(field):
        written = table[name]
        if written in FROM_THE_STACK:
            assert default is None, f"{name}: the README says {written!r}, the default is {default!r}"
            continue
        # The documented text, read as the environment would give it, is the default.
        value = written.replace("$TMPDIR", tempfile.gettempdir())
        loaded = getattr(Settings.load(env={name: value}), field.name)
        assert loaded == default, f"{name}: the README says {written!r}, the default is {default!r}"
