"""The help style every command line of the project shares: each option shows its default.

An operator reading ``--help`` should never have to guess what happens when an option is left
out, and descriptions keep their line breaks (examples, schemas). Giving the style to the
parser class rather than to each ``add_parser`` call means subcommands registered by shared
helpers (ledger tools, certification) get it too.
"""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

__all__ = ["HelpFormatter", "HelpfulParser", "RenamedOption", "add_renamed_option"]


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions keep their line breaks; every option's help ends with its default.

    In a description each line is a paragraph wrapped to the terminal, and an indented line
    (an example, a schema table) is kept as written. A help text that already says
    "default" is left alone; required options and flags get no suffix (a flag is off unless
    given); an option without a value shows "not set".
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(
            indent + line if not line.strip() or line[0].isspace()
            else textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
            for line in text.splitlines())

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (not action.option_strings or action.required or "default" in text.lower()
                or action.default is argparse.SUPPRESS or action.nargs == 0):
            return text
        default = action.default
        if default is None or default == []:
            return f"{text} (default: not set)"
        return f"{text} (default: %(default)s)"


class HelpfulParser(argparse.ArgumentParser):
    """``ArgumentParser`` with :class:`HelpFormatter`; subparsers inherit the class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


class RenamedOption(argparse.Action):
    """An option's old spelling: refused with its new name, never read as an alias."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser.error(f"{option_string} was renamed: use {self.new}")


def add_renamed_option(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Refuse ``old`` with a message naming ``new`` (docs/architecture.md, Policy)."""
    parser.add_argument(old, action=RenamedOption, new=new)
