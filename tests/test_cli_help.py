"""Every command line documents itself: each option has help and shows its default, each
subcommand has a description (issue 14: an operator follows ``--help``, not the source)."""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Callable, Iterator

import pytest

from agency_a.cli import TERMINAL_ROW_LIMIT, _result_limit
from agency_a.cli import build_parser as agency_a_parser
from agency_a.store import format_result_rows
from agency_b.cli import build_parser as agency_b_parser
from protocol.cli.authority import build_parser as authority_parser
from protocol.cli.help import RenamedOption
from protocol.domain.records import CSV_SCHEMA_HELP

PARSERS = {"agency-a": agency_a_parser, "agency-b": agency_b_parser,
           "psi-authority": authority_parser}


def walk(parser: argparse.ArgumentParser,
         path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(command path, parser) for the parser and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")


def all_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    return [item for prog, build in PARSERS.items() for item in walk(build(), prog)]


def test_every_option_has_help_and_every_subcommand_a_description() -> None:
    undocumented: list[str] = []
    for path, parser in all_parsers():
        if not (parser.description or "").strip():
            undocumented.append(f"{path}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction
                          | RenamedOption):  # an old spelling, hidden and refused
                continue
            name = "/".join(action.option_strings) or action.dest
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                undocumented.append(f"{path} {name}: no help")
    assert undocumented == []


def test_every_optional_value_shows_its_default() -> None:
    """Options that take a value and may be left out say what happens then."""
    silent: list[str] = []
    for path, parser in all_parsers():
        help_text = parser.format_help()
        for action in parser._actions:
            if (not action.option_strings or action.required or action.nargs == 0
                    or isinstance(action, argparse._HelpAction | RenamedOption)):
                continue
            formatter = parser._get_formatter()
            rendered = formatter._expand_help(action) if action.help else ""
            if "default" not in rendered.lower():
                silent.append(f"{path} {action.option_strings[0]}")
        assert help_text  # renders without a formatting error
    assert silent == []


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_subcommands_are_listed_with_a_summary(prog: str) -> None:
    """The top-level --help names every subcommand with its one-line help (tiers included)."""
    parser = PARSERS[prog]()
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert choice.dest in text and (choice.help or "").strip(), choice.dest


def test_every_help_renders_and_the_input_commands_show_the_csv_schema(
        capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` of each command runs (exit 0); those that read a CSV print its schema."""
    for path, build in PARSERS.items():
        for command, _ in walk(build(), path):
            with pytest.raises(SystemExit) as info:
                build().parse_args([*command.split()[1:], "--help"])
            assert info.value.code == 0
            assert capsys.readouterr().out.startswith("usage:"), command
    schema_commands = {"psi-authority issue", "psi-authority review", "agency-a match",
                       "agency-b serve"}
    for path, parser in all_parsers():
        if path in schema_commands:
            assert CSV_SCHEMA_HELP.splitlines()[-1].strip() in parser.format_help(), path


ROWS = [{"query_record_id": f"Q-{i}", "rule_id": "tin+dob", "pseudonym": f"p{i}",
         "fields": {"zip": "62701", "address": "=HYPERLINK(\"x\")" if i == 0 else "12 Main St"}}
        for i in range(3)]


def test_results_export_as_csv_escapes_formulas() -> None:
    rows = list(csv.reader(io.StringIO(format_result_rows(ROWS, "csv"))))
    assert rows[0] == ["query_record_id", "rule_id", "pseudonym", "fields.address",
                       "fields.zip"]
    assert rows[1] == ["Q-0", "tin+dob", "p0", "'=HYPERLINK(\"x\")", "62701"]
    assert len(rows) == 4


def test_results_export_as_json_and_text() -> None:
    assert json.loads(format_result_rows(ROWS, "json")) == ROWS
    lines = format_result_rows(ROWS, "text").splitlines()
    assert lines[2] == "Q-2\ttin+dob\tzip=62701, address=12 Main St"
    with pytest.raises(ValueError, match="unknown result format"):
        format_result_rows(ROWS, "xml")


@pytest.mark.parametrize(("argv", "limit"), [
    ([], TERMINAL_ROW_LIMIT),                  # a screenful on the terminal, and says so
    (["--limit", "0"], None),                  # 0 means all, not nothing
    (["--limit", "5"], 5),
    (["--format", "json"], None),              # machine formats get every row
    (["--out", "r.csv", "--format", "csv"], None),
])
def test_results_limit(argv: list[str], limit: int | None) -> None:
    base = ["results", "--server", "x:1", "--certs", "c", "--operator", "o", "--job", "j",
            "--purpose", "p"]
    assert _result_limit(agency_a_parser().parse_args(base + argv)) == limit


@pytest.mark.parametrize("build", [agency_a_parser, authority_parser])
def test_the_tiers_are_discoverable_from_the_top_level_help(
        build: Callable[[], argparse.ArgumentParser]) -> None:
    text = " ".join(build().format_help().split())
    for tier in ("identity", "aggregate", "cardinality"):
        assert tier in text
