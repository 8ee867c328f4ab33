"""Typo-tolerant match-key components (docs/architecture.md, Recall and misidentification).

Exact keys miss people whose records carry ordinary errors.  Two kinds of tolerance fit
inside PSI, where the custodian's tag for a record must be computed without seeing the
query:

* **canonical forms** that both sides compute the same way, so they cost no budget: a
  phonetic code of each name (NYSIIS, from the maintained ``jellyfish`` package), a
  nickname folded to its formal name (the ``nicknames`` package's maintained list), a
  compound surname with its spaces and hyphens removed;
* **query-side variants**: extra keys only the requester evaluates (a TIN with two
  adjacent digits swapped back, a date of birth with day and month swapped back, first and
  last name exchanged, one part of a compound surname, each formal name of an ambiguous
  nickname).  The custodian's tags stay one per record and rule; every variant costs one
  budget unit, which the authority counts exactly before signing.

Everything here is pure and deterministic; tables are built lazily once.
"""

from __future__ import annotations

from contextlib import suppress
from datetime import date, timedelta
from functools import lru_cache

import jellyfish

__all__ = [
    "dob_swaps",
    "dob_typos",
    "first_name_alternatives",
    "first_name_canonical",
    "phonetic",
    "surname_canonical",
    "surname_parts",
    "tin_transpositions",
]

#: Earliest year a date of birth may have (records refuse earlier ones).
MIN_YEAR = 1900
#: Shortest part of a compound surname tried alone ("de", "la" are particles, not surnames).
_MIN_SURNAME_PART = 3


def phonetic(name: str) -> str:
    """NYSIIS code of a normalized name with its spaces removed ("" for "").

    NYSIIS keeps more of a name than Soundex (no 4-character cut), so common names stay
    apart while single-letter typos, doubled letters and vowel slips mostly agree.
    """
    joined = name.replace(" ", "")
    return _nysiis(joined) if joined else ""


@lru_cache(maxsize=1 << 17)
def _nysiis(name: str) -> str:
    return str(jellyfish.nysiis(name))


@lru_cache(maxsize=1)
def _namer() -> object:
    from nicknames import NickNamer

    return NickNamer()


@lru_cache(maxsize=1 << 15)
def _formal_names(name: str) -> tuple[str, ...]:
    """Formal names a nickname stands for, sorted: the longer names that list it as one of
    their nicknames (the package's list is symmetric in places, "william" <-> "bill", so
    the longer name is taken as the formal one)."""
    if not name or " " in name:
        return ()
    namer = _namer()
    formal = {c for c in namer.canonicals_of(name)  # type: ignore[attr-defined]
              if len(c) > len(name) and name in namer.nicknames_of(c)}  # type: ignore[attr-defined]
    return tuple(sorted(formal))


def first_name_canonical(name: str) -> str:
    """A normalized first name folded to its formal name when that is unambiguous.

    "jim" -> "james", "bill" stays "bill" (it stands for William, Robert, Willis...): the
    ambiguous ones are what :func:`first_name_alternatives` adds on the query side.
    """
    formal = _formal_names(name)
    return formal[0] if len(formal) == 1 else name


def first_name_alternatives(name: str) -> tuple[str, ...]:
    """Query-side alternatives of an ambiguous nickname: each formal name it stands for."""
    formal = _formal_names(name)
    return formal if len(formal) > 1 else ()


def surname_canonical(name: str) -> str:
    """A normalized surname with the spaces (from hyphens, blanks) between its parts removed,
    so "Smith-Jones", "Smith Jones" and "SmithJones" agree."""
    return name.replace(" ", "")


def surname_parts(name: str) -> tuple[str, ...]:
    """The parts of a compound surname that could be written alone (query-side variants)."""
    parts = name.split()
    if len(parts) < 2:
        return ()
    return tuple(dict.fromkeys(p for p in parts if len(p) >= _MIN_SURNAME_PART))


def tin_transpositions(tin: str) -> tuple[str, ...]:
    """Every digit string (TIN, ZIP) one adjacent transposition away (distinct digits only),
    in position order."""
    out = []
    for i in range(len(tin) - 1):
        a, b = tin[i], tin[i + 1]
        if a != b:
            out.append(tin[:i] + b + a + tin[i + 2:])
    return tuple(out)


def dob_swaps(dob: date) -> tuple[date, ...]:
    """The date with day and month exchanged, when that is another calendar date."""
    if dob.day == dob.month or dob.day > 12:
        return ()
    return (date(dob.year, dob.day, dob.month),)


def dob_typos(dob: date) -> tuple[date, ...]:
    """Dates one ordinary slip away: the day off by one, or the decade off by one (1975 for
    1985), each a calendar date (a 29 February whose decade shift is no leap day drops)."""
    out = [dob - timedelta(days=1), dob + timedelta(days=1)]
    for years in (-10, 10):
        with suppress(ValueError):
            out.append(dob.replace(year=dob.year + years))
    return tuple(d for d in out if d.year >= MIN_YEAR)
