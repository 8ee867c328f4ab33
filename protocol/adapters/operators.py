"""The requester's operator roster: who may submit jobs and read or purge results.

An operator is an identity from a list the agency configures (``agency-a init --operator``
writes it, ``agency-a serve --operators`` reads it), never free text typed at a prompt: every
read of disclosed results is logged against that name, so a name nobody vouched for would make
the access log meaningless.  The file holds one id per line; ``#`` starts a comment.
See docs/architecture.md, Files and logs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from protocol.adapters.files import PathLike, write_file_atomic

__all__ = [
    "MAX_OPERATOR_CHARS",
    "OPERATORS_FILE",
    "OperatorRoster",
    "operator_problem",
    "read_operator_roster",
    "write_operator_roster",
]

OPERATORS_FILE = "operators.txt"
"""Default roster name, in the requester's secrets directory."""
MAX_OPERATOR_CHARS = 64
# Like agency ids, plus "@" for e-mail style names: printable, no spaces or separators that
# could forge a log field or a CSV cell.
_OPERATOR_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*")


def operator_problem(operator: object) -> str | None:
    """Why ``operator`` is not a well-formed operator id, or None if it is.

    Blank, whitespace-only, oversized, control characters and anything outside the
    alphabet are named specifically, so a refusal can say what is wrong.
    """
    if not isinstance(operator, str) or not operator:
        return "an operator id is required"
    if not operator.strip():
        return "the operator id is blank (whitespace only)"
    if len(operator) > MAX_OPERATOR_CHARS:
        return f"the operator id has {len(operator)} characters, at most {MAX_OPERATOR_CHARS}"
    if not operator.isprintable():
        return "the operator id contains control characters"
    if _OPERATOR_RE.fullmatch(operator) is None:
        return ("the operator id must start with a letter or digit and use only "
                "[A-Za-z0-9._@-]")
    return None


class OperatorRoster:
    """The configured operator ids; membership is exact (case-sensitive)."""

    def __init__(self, operators: Iterable[str]) -> None:
        ids = list(operators)
        for operator in ids:
            problem = operator_problem(operator)
            if problem:
                raise ValueError(f"invalid operator {operator[:MAX_OPERATOR_CHARS]!r}: {problem}")
        if not ids:
            raise ValueError("the operator roster is empty: name at least one operator")
        self._ids = frozenset(ids)

    def __contains__(self, operator: object) -> bool:
        return operator in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._ids))


def read_operator_roster(path: PathLike) -> OperatorRoster:
    """Read a roster file; a malformed line is an error that names the file and line."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(
            f"operator roster {source} not found: create it with "
            "'agency-a init --operator NAME' or pass --operators FILE")
    mode = source.stat().st_mode
    if mode & 0o022:
        # whoever can write the roster can make themselves an operator
        raise PermissionError(f"operator roster {source} is writable by group/others (mode "
                              f"{oct(mode & 0o777)}); chmod 600 it")
    ids: list[str] = []
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        operator = line.split("#", 1)[0].strip()
        if not operator:
            continue
        problem = operator_problem(operator)
        if problem:
            raise ValueError(f"{source}:{number}: {problem}")
        ids.append(operator)
    if not ids:
        raise ValueError(f"operator roster {source} names no operator")
    return OperatorRoster(ids)


def write_operator_roster(path: PathLike, operators: Iterable[str], *, force: bool) -> Path:
    """Write a roster (0600, atomically); without ``force`` an existing roster is kept."""
    roster = OperatorRoster(operators)  # validates before anything is written
    text = "# operators of this requester, one per line\n" + "".join(
        f"{operator}\n" for operator in roster)
    write_file_atomic(path, text.encode("utf-8"), overwrite=force)
    return Path(path)
