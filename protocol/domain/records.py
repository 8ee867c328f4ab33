"""Person records: schema, CSV, validation, normalization and match-rule keys.

The court case behind this project turned on bad request records: placeholder addresses
("Failed to Provide", "NA NA"), ZIP codes accepted as addresses, and name+address matching
that misidentified people. This module is where such records are stopped. It refuses each bad
query record individually with a machine-readable :class:`ReasonCode`, normalizes the fields
that survive, and turns a record into the exact *match-key bytes* that the OPRF layer evaluates.

Everything here is pure (no network, no clock, no global state besides read-only tables and
LRU caches): the checks that depend on the date (a birth date in the future, a tax period not
yet begun) take ``today`` from the caller (docs/architecture.md, Clock and time). It is tuned
for ~1.3M records: regexes and translation tables are built once at import time and the
normalization of repeated values (names, dates, ZIPs) is cached.

Conventions:

* String normalizers (:func:`normalize_name`, :func:`normalize_address`) return ``""`` when
  nothing usable remains; value normalizers (:func:`normalize_dob`, :func:`normalize_tin`,
  :func:`normalize_zip`) return ``None`` when the value is missing or malformed.
* CSV line numbers are 1-based physical line numbers of the first line of a row (the header is
  line 1). The ``*_with_lines`` readers return ``(line, record)`` pairs; refusals carry them.
* CSV functions read and write open text streams (``newline=""``); opening files is the
  caller's (``protocol.adapters.files.open_csv``), so nothing here touches the file system.
* The CSV schema an operator sees (``--help``, the bad-header error, the README's "Input
  files") is :data:`CSV_SCHEMA_HELP`: one text, so the three never disagree. Only the
  columns a file's use needs are required; an absent optional column reads as blank.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import IntEnum, StrEnum
from functools import lru_cache
from itertools import combinations, islice
from operator import itemgetter
from typing import NoReturn, SupportsIndex, TextIO, cast, overload

import numpy as np

from protocol.crypto.encoding import LENGTH_BYTES, decode, encode, lp, u64
from protocol.domain.variants import (
    dob_swaps,
    dob_typos,
    first_name_alternatives,
    first_name_canonical,
    phonetic,
    surname_canonical,
    surname_parts,
    tin_transpositions,
)
from protocol.errors import InvalidRecordError

__all__ = [
    "CSV_SCHEMA_HELP",
    "DEFAULT_RULES",
    "DISCLOSABLE_FIELDS",
    "MATCH_KEY_DST",
    "MATCH_RULES",
    "MAX_CORROBORATION",
    "PERSON_FIELDS",
    "QUERY_META_FIELDS",
    "QUERY_REVIEW_COLUMNS",
    "RECORD_CLASS_FIELD",
    "RULE_FIELDS",
    "MatchRule",
    "PersonRecord",
    "QueryMetadata",
    "QueryRecord",
    "ReasonCode",
    "Refusal",
    "Strength",
    "ValidatedQueries",
    "ValidationReport",
    "Variant",
    "address_problem",
    "corroborated_pairs",
    "corroborating_group",
    "decode_match_key",
    "encode_match_key",
    "evaluation_count",
    "field_columns",
    "get_rule",
    "independent_group",
    "key_components",
    "key_rows_bulk",
    "match_keys_bulk",
    "match_keys_from_columns",
    "normalize_address",
    "normalize_dob",
    "normalize_name",
    "normalize_tax_period",
    "normalize_tin",
    "normalize_zip",
    "query_match_keys_bulk",
    "read_person_csv",
    "read_person_csv_with_lines",
    "read_query_csv",
    "read_query_csv_with_lines",
    "rule_columns",
    "rules_independent",
    "split_suffix",
    "validate_person",
    "validate_persons",
    "validate_queries",
    "validate_query",
    "write_person_csv",
    "write_query_csv",
]

# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------

PERSON_FIELDS: tuple[str, ...] = (
    "record_id",
    "tin",
    "first_name",
    "last_name",
    "dob",
    "address",
    "city",
    "state",
    "zip",
)
QUERY_META_FIELDS: tuple[str, ...] = ("tax_periods", "statute", "reason")
RECORD_CLASS_FIELD = "record_class"

#: Fields a custodian may be authorized to disclose. Extra CSV columns (e.g. ``tax_paid_cents``)
#: are disclosable only when an authorization names them explicitly.
DISCLOSABLE_FIELDS: tuple[str, ...] = (
    "first_name",
    "last_name",
    "dob",
    "address",
    "city",
    "state",
    "zip",
    "tin",
)

_PERSON_FIELD_SET = frozenset(PERSON_FIELDS)
_TAX_PERIOD_SEP = ";"  # written between tax periods; read: any of _TAX_PERIOD_SPLIT
_TAX_PERIOD_SPLIT = re.compile(r"[;,\s]+")


@dataclass(frozen=True, slots=True)
class PersonRecord:
    """One person as held by either agency; all fields are raw strings ("" when absent).

    ``record_class`` is the custodian's classification (e.g. ``"protected"``) used by policy
    exclusions; ``extra`` keeps every other CSV column in header order so nothing is lost.
    """

    record_id: str = ""
    tin: str = ""
    first_name: str = ""
    last_name: str = ""
    dob: str = ""
    address: str = ""
    city: str = ""
    state: str = ""
    zip: str = ""
    record_class: str = ""
    extra: tuple[tuple[str, str], ...] = ()

    def get(self, field_name: str, default: str | None = None) -> str:
        """Value of a person field, ``record_class`` or extra column.

        Disclosure code asks for fields by name, so one accessor covers both kinds. An unknown
        name returns ``default`` if given, else raises ``KeyError`` (never a silent ``""``).
        """
        if field_name in _PERSON_FIELD_SET or field_name == RECORD_CLASS_FIELD:
            return getattr(self, field_name)  # type: ignore[no-any-return]
        for key, value in self.extra:
            if key == field_name:
                return value
        if default is not None:
            return default
        raise KeyError(field_name)


@dataclass(frozen=True, slots=True)
class QueryMetadata:
    """Per-subject request requirements: tax periods, statute and reason (legal basis)."""

    tax_periods: tuple[str, ...]
    statute: str
    reason: str


@dataclass(frozen=True, slots=True)
class QueryRecord:
    """A requester's subject: the person to locate plus the per-subject legal metadata."""

    person: PersonRecord
    metadata: QueryMetadata


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


class ReasonCode(StrEnum):
    """Why a record was refused; values are stable snake_case strings for reports and gRPC."""

    MISSING_RECORD_ID = "missing_record_id"
    DUPLICATE_RECORD_ID = "duplicate_record_id"
    MISSING_NAME = "missing_name"
    PLACEHOLDER_ADDRESS = "placeholder_address"
    ZIP_ONLY_ADDRESS = "zip_only_address"
    MISSING_ADDRESS = "missing_address"
    MALFORMED_ZIP = "malformed_zip"
    MALFORMED_TIN = "malformed_tin"
    IMPOSSIBLE_DOB = "impossible_dob"
    MISSING_TAX_PERIODS = "missing_tax_periods"
    MALFORMED_TAX_PERIOD = "malformed_tax_period"
    MISSING_STATUTE = "missing_statute"
    MISSING_REASON = "missing_reason"


@dataclass(frozen=True)
class Refusal:
    """One reason one record was refused; ``line`` is its CSV line (0 when unknown)."""

    record_id: str
    line: int
    code: ReasonCode
    detail: str


@dataclass
class ValidationReport:
    """Outcome of validating a batch: every input is either accepted or refused, never dropped.

    A record may carry several refusals (at most one per :class:`ReasonCode`). Refused records
    are identified by their line number, so ``len(accepted) + refused_record_count ==
    input_count`` as long as line numbers are distinct (they are, from the CSV readers).
    """

    accepted: ValidatedQueries
    refused: list[Refusal]
    accepted_lines: list[int] = field(default_factory=list)
    input_count: int = 0

    def counts_by_reason(self) -> dict[str, int]:
        """Refusals per reason code; since codes are not repeated per record, also records."""
        counts = Counter(str(r.code) for r in self.refused)
        return dict(sorted(counts.items()))

    @property
    def refused_record_count(self) -> int:
        """Number of distinct refused records."""
        return len({r.line for r in self.refused})


#: Held only by :func:`validate_queries`: what makes a :class:`ValidatedQueries` genuine.
_VALIDATED = object()


class ValidatedQueries(list[QueryRecord]):
    """Queries that passed :func:`validate_queries` (its ``accepted``): what sessions take.

    The type is the proof that a batch was validated, so a session need not validate it
    again, and a batch that was not is caught: only :func:`validate_queries` makes one, it is
    read-only (nothing unvalidated can be added later) and a slice of it stays validated.
    Anything else handed to a session goes through :meth:`ensure`.
    """

    __slots__ = ()

    def __init__(self, queries: Iterable[QueryRecord] = (), _proof: object = None) -> None:
        if _proof is not _VALIDATED:
            raise TypeError("ValidatedQueries are made by validate_queries(...): pass its "
                            ".accepted")
        super().__init__(queries)

    @overload
    def __getitem__(self, index: SupportsIndex) -> QueryRecord: ...
    @overload
    def __getitem__(self, index: slice) -> ValidatedQueries: ...

    def __getitem__(self, index: SupportsIndex | slice) -> QueryRecord | ValidatedQueries:
        if isinstance(index, slice):  # a part of a valid batch has no new duplicates
            return ValidatedQueries(super().__getitem__(index), _VALIDATED)
        return super().__getitem__(index)

    def __reduce__(self) -> tuple[Callable[[list[QueryRecord]], ValidatedQueries],
                                  tuple[list[QueryRecord]]]:
        return _revalidated, (list(self),)

    def _read_only(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("ValidatedQueries is read-only: build a new list and validate it "
                        "with validate_queries(...)")

    append = extend = insert = remove = pop = clear = sort = reverse = _read_only
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only

    @classmethod
    def ensure(cls, queries: object, *, today: date) -> ValidatedQueries:
        """``queries`` as validated queries, for a session's constructor.

        Returned as is when :func:`validate_queries` made them; a plain sequence of
        :class:`QueryRecord` is validated now with the same rules and refused as a whole
        (``InvalidRecordError`` naming the first refusals) if any record would be refused,
        because a refused record must never enter the protocol. Anything but query records
        is a ``TypeError`` naming the expected type.
        """
        if isinstance(queries, ValidatedQueries):
            return queries
        if isinstance(queries, str | bytes | dict) or not isinstance(queries, Iterable):
            raise TypeError("queries must be a list of QueryRecord, ideally "
                            f"validate_queries(...).accepted; got {type(queries).__name__}")
        items = list(queries)
        for position, query in enumerate(items):
            if not isinstance(query, QueryRecord):
                raise TypeError(_not_a_query(query, f"queries[{position}]"))
        report = validate_queries(enumerate(items, 1), today=today)
        if report.refused:
            shown = "; ".join(f"query #{r.line} ({r.record_id or 'no record_id'}): {r.code}: "
                              f"{r.detail}" for r in report.refused[:3])
            raise InvalidRecordError(
                f"{report.refused_record_count} of {len(items)} queries would be refused "
                f"({shown}{'; ...' if len(report.refused) > 3 else ''}): run "
                "validate_queries(...) first and pass its .accepted; refused records never "
                "enter the protocol")
        return report.accepted


def _revalidated(queries: list[QueryRecord]) -> ValidatedQueries:
    """Unpickle: the queries were validated when the pickled list was made."""
    return ValidatedQueries(queries, _VALIDATED)


def _not_a_query(value: object, where: str) -> str:
    """The TypeError message for something that is not a :class:`QueryRecord`."""
    got = type(value).__name__
    if isinstance(value, PersonRecord):
        return (f"{where} is a PersonRecord; a query is a QueryRecord(person, "
                "QueryMetadata(tax_periods, statute, reason)): the legal basis is checked too")
    return (f"{where} must be a QueryRecord(PersonRecord(...), QueryMetadata(...)), got {got}"
            + (" (records are dataclasses, not dicts: PersonRecord(**row))"
               if isinstance(value, dict) else ""))


# --------------------------------------------------------------------------------------------
# Normalization tables (built once)
# --------------------------------------------------------------------------------------------

_APOSTROPHES = "'`\u2018\u2019\u02bc\u00b4\u2032"
# Letters that have no Unicode decomposition but an obvious ASCII reading.
_TRANSLITERATE = {
    "\u00f8": "o",  # ø
    "\u0142": "l",  # ł
    "\u00e6": "ae",  # æ
    "\u0153": "oe",  # œ
    "\u0111": "d",  # đ
    "\u00f0": "d",  # ð
    "\u00fe": "th",  # þ
    "\u0131": "i",  # dotless i
    "\u00df": "ss",  # ß (casefold covers it too)
}


def _build_translation() -> dict[int, str | None]:
    """Punctuation becomes a space, apostrophes vanish (so O'Brien == OBrien)."""
    table: dict[int, str | None] = {}
    for code in range(128):
        ch = chr(code)
        if not ch.isalnum() and not ch.isspace():
            table[code] = " "
    for ch in _APOSTROPHES:
        table[ord(ch)] = None
    for ch in "\u2010\u2011\u2012\u2013\u2014\u2015\u00b7\u00ab\u00bb\u00bf\u00a1\u201c\u201d":
        table[ord(ch)] = " "
    for src, dst in _TRANSLITERATE.items():
        table[ord(src)] = dst
    return table


def _build_ascii_table() -> bytes:
    """ASCII fast path in one C pass: lowercase letters, punctuation/controls to space."""
    out = bytearray()
    for code in range(256):
        ch = chr(code)
        if code < 128 and (ch.isalnum() or ch.isspace()):
            out.append(ord(ch.lower()))
        else:
            out.append(ord(" "))
    return bytes(out)


_FOLD_TABLE = _build_translation()
_ASCII_TABLE = _build_ascii_table()
_ASCII_DELETE = "".join(c for c in _APOSTROPHES if c.isascii()).encode("ascii")
_NON_WORD_RE = re.compile(r"[^\w\s]+")
_WS_RE = re.compile(r"\s+")

_HONORIFICS = frozenset({"mr", "mrs", "ms", "dr"})

_SUFFIXES: dict[str, str] = {
    "jr": "jr",
    "junior": "jr",
    "sr": "sr",
    "senior": "sr",
    "ii": "ii",
    "2nd": "ii",
    "iii": "iii",
    "3rd": "iii",
    "iv": "iv",
    "4th": "iv",
}

#: Unit designators all fold to one token so "Apt 4", "Unit 4", "Suite 4" and "#4" agree.
_UNIT_CANONICAL = "apt"
_UNIT_WORDS = ("apartment", "apt", "unit", "suite", "ste", "#")

# USPS Publication 28 (C1) street suffixes: common spellings -> standard abbreviation.
_STREET_SUFFIXES: dict[str, tuple[str, ...]] = {
    "aly": ("alley", "allee", "ally"),
    "anx": ("annex", "anex", "annx"),
    "arc": ("arcade",),
    "ave": ("avenue", "av", "aven", "avenu", "avn", "avnue"),
    "byu": ("bayou", "bayoo"),
    "bch": ("beach",),
    "bnd": ("bend",),
    "blf": ("bluff", "bluf"),
    "btm": ("bottom", "bot", "bottm"),
    "blvd": ("boulevard", "boul", "boulv"),
    "br": ("branch", "brnch"),
    "brg": ("bridge", "brdge"),
    "brk": ("brook",),
    "byp": ("bypass", "bypa", "bypas", "byps"),
    "cp": ("camp", "cmp"),
    "cyn": ("canyon", "canyn", "cnyn"),
    "cpe": ("cape",),
    "cswy": ("causeway", "causwa"),
    "ctr": ("center", "centre", "cent", "centr", "cntr", "cnter"),
    "cir": ("circle", "circ", "circl", "crcl", "crcle"),
    "clf": ("cliff",),
    "clfs": ("cliffs",),
    "clb": ("club",),
    "cmn": ("common",),
    "cor": ("corner",),
    "crse": ("course",),
    "ct": ("court",),
    "cts": ("courts",),
    "cv": ("cove",),
    "crk": ("creek",),
    "cres": ("crescent", "crsent", "crsnt"),
    "xing": ("crossing", "crssng"),
    "dl": ("dale",),
    "dm": ("dam",),
    "dr": ("drive", "driv", "drv"),
    "est": ("estate",),
    "ests": ("estates",),
    "expy": ("expressway", "exp", "expr", "express", "expw"),
    "ext": ("extension", "extn", "extnsn"),
    "fls": ("falls",),
    "fry": ("ferry", "frry"),
    "fld": ("field",),
    "flds": ("fields",),
    "flt": ("flat",),
    "frd": ("ford",),
    "frst": ("forest", "forests"),
    "frg": ("forge", "forg"),
    "frk": ("fork",),
    "ft": ("fort", "frt"),
    "fwy": ("freeway", "freewy", "frway", "frwy"),
    "gdn": ("garden", "gardn", "grden", "grdn"),
    "gdns": ("gardens", "grdns"),
    "gtwy": ("gateway", "gatewy", "gatway", "gtway"),
    "gln": ("glen",),
    "grn": ("green",),
    "grv": ("grove", "grov"),
    "hbr": ("harbor", "harb", "harbr", "hrbor"),
    "hvn": ("haven",),
    "hts": ("heights", "ht"),
    "hwy": ("highway", "highwy", "hiway", "hiwy", "hway"),
    "hl": ("hill",),
    "hls": ("hills",),
    "holw": ("hollow", "hllw", "hollows", "holws"),
    "is": ("island", "islnd"),
    "iss": ("islands", "islnds"),
    "jct": ("junction", "jction", "jctn", "junctn", "juncton"),
    "ky": ("key",),
    "knl": ("knoll", "knol"),
    "lk": ("lake",),
    "lks": ("lakes",),
    "lndg": ("landing", "lndng"),
    "ln": ("lane",),
    "lgt": ("light",),
    "lf": ("loaf",),
    "lck": ("lock",),
    "ldg": ("lodge", "ldge", "lodg"),
    "mnr": ("manor",),
    "mdw": ("meadow",),
    "mdws": ("meadows", "medows"),
    "ml": ("mill",),
    "msn": ("mission", "missn", "mssn"),
    "mtwy": ("motorway",),
    "mt": ("mount", "mnt"),
    "mtn": ("mountain", "mntain", "mntn", "mountin", "mtin"),
    "nck": ("neck",),
    "orch": ("orchard", "orchrd"),
    "pkwy": ("parkway", "parkwy", "pkway", "pky", "parkways", "pkwys"),
    "pne": ("pine",),
    "pnes": ("pines",),
    "pl": ("place",),
    "pln": ("plain",),
    "plns": ("plains",),
    "plz": ("plaza", "plza"),
    "pt": ("point",),
    "pts": ("points",),
    "prt": ("port",),
    "pr": ("prairie", "prr"),
    "radl": ("radial", "rad", "radiel"),
    "rnch": ("ranch", "ranches", "rnchs"),
    "rpd": ("rapid",),
    "rpds": ("rapids",),
    "rst": ("rest",),
    "rdg": ("ridge", "rdge"),
    "riv": ("river", "rvr", "rivr"),
    "rd": ("road",),
    "rds": ("roads",),
    "rte": ("route",),
    "shl": ("shoal",),
    "shr": ("shore", "shoar"),
    "spg": ("spring", "spng", "sprng"),
    "spgs": ("springs", "spngs", "sprngs"),
    "sq": ("square", "sqr", "sqre", "squ"),
    "sta": ("station", "statn", "stn"),
    "stra": ("stravenue", "strav", "straven", "stravn", "strvn", "strvnue"),
    "strm": ("stream", "streme"),
    "st": ("street", "strt", "str"),
    "sts": ("streets",),
    "smt": ("summit", "sumit", "sumitt"),
    "ter": ("terrace", "terr"),
    "trwy": ("throughway",),
    "trce": ("trace", "traces"),
    "trak": ("track", "tracks", "trk", "trks"),
    "trfy": ("trafficway",),
    "trl": ("trail", "trails", "trls"),
    "trlr": ("trailer", "trlrs"),
    "tunl": ("tunnel", "tunel", "tunls", "tunnels", "tunnl"),
    "tpke": ("turnpike", "trnpk", "turnpk"),
    "upas": ("underpass",),
    "un": ("union",),
    "vly": ("valley", "vally", "vlly"),
    "via": ("viaduct", "vdct", "viadct"),
    "vw": ("view",),
    "vlg": ("village", "vill", "villag", "villg", "villiage"),
    "vl": ("ville",),
    "vis": ("vista", "vist", "vst", "vsta"),
    "wy": ("way",),
    "wl": ("well",),
    "wls": ("wells",),
}
_DIRECTIONALS = {
    "north": "n",
    "south": "s",
    "east": "e",
    "west": "w",
    "northeast": "ne",
    "northwest": "nw",
    "southeast": "se",
    "southwest": "sw",
}
_ORDINAL_WORDS = {
    "first": "1st",
    "second": "2nd",
    "third": "3rd",
    "fourth": "4th",
    "fifth": "5th",
    "sixth": "6th",
    "seventh": "7th",
    "eighth": "8th",
    "ninth": "9th",
    "tenth": "10th",
}


def _build_address_tokens() -> dict[str, str]:
    tokens: dict[str, str] = {}
    for abbr, spellings in _STREET_SUFFIXES.items():
        for spelling in spellings:
            tokens[spelling] = abbr
    # "way" is far more common spelled out; keep the plain word as the canonical form.
    tokens.pop("way", None)
    tokens.update(_DIRECTIONALS)
    tokens.update(_ORDINAL_WORDS)
    for word in _UNIT_WORDS:
        tokens[word] = _UNIT_CANONICAL
    return tokens


_ADDRESS_TOKENS = _build_address_tokens()
_DOTTED_INITIALS_RE = re.compile(r"(?<=\b[^\W\d_])\.(?=[^\W\d_]\b)")
_REPEATED_UNIT_RE = re.compile(r"\bapt(?: apt)+\b")
_PO_BOX_RE = re.compile(r"\b(?:p o box|post office box|pobox)\b")

# USPS state, territory and military codes: an address made only of these and a ZIP has no street.
_STATE_CODES = (
    "al ak az ar ca co ct de dc fl ga hi id il in ia ks ky la me md ma mi mn ms mo mt ne nv "
    "nh nj nm ny nc nd oh ok or pa ri sc sd tn tx ut vt va wa wv wi wy pr vi gu as mp aa ae ap"
)
_US_STATES = frozenset(_STATE_CODES.split())
_ZIP_WORDS = frozenset({"zip", "zipcode", "code", "postal", "postcode", "zip4"})

# Phrases the brief names as placeholders; matched after address normalization.
_PLACEHOLDER_PHRASES_RAW = (
    "failed to provide",
    "unknown address",
    "unknown",
    "na na",
    "n/a",
    "na",
    "none",
    "no address",
    "not provided",
    "address unknown",
    "tbd",
    "xxx",
    "homeless",
    "general delivery",
    "same",
    "-",
    ".",
)
# Further words that, when they make up the *whole* address, still carry no location.
_PLACEHOLDER_EXTRA_WORDS = (
    "addr",
    "unk",
    "unkn",
    "null",
    "nil",
    "missing",
    "given",
    "available",
    "unavailable",
    "not",
    "on",
    "file",
    "record",
    "refused",
    "declined",
    "blank",
    "x",
    "xx",
    "xxxx",
    "xxxxx",
    "invalid",
    "provided",
    "as",
    "above",
)


# --------------------------------------------------------------------------------------------
# Normalizers
# --------------------------------------------------------------------------------------------


def _fold(s: str) -> str:
    """Unicode-fold and strip punctuation; the shared core of name and address normalization."""
    if s.isascii():
        return s.encode("ascii").translate(_ASCII_TABLE, _ASCII_DELETE).decode("ascii")
    s = unicodedata.normalize("NFKC", s).casefold()
    s = unicodedata.normalize("NFKD", s)
    s = "".join(ch for ch in s if not unicodedata.combining(ch))
    s = unicodedata.normalize("NFKC", s).translate(_FOLD_TABLE)
    if not s.isascii():
        s = _NON_WORD_RE.sub(" ", s).replace("_", " ")
    return s


@lru_cache(maxsize=1 << 17)
def normalize_name(s: str) -> str:
    """Canonical form of a personal name; ``""`` when nothing usable remains.

    NFKC, accents stripped (NFKD minus combining marks), casefolded, punctuation to spaces
    (apostrophes are removed instead, so "O'Brien" and "OBrien" agree), whitespace collapsed,
    honorifics (mr, mrs, ms, dr) dropped. Idempotent.
    """
    if not s:
        return ""
    return " ".join(t for t in _fold(s).split() if t not in _HONORIFICS)


@lru_cache(maxsize=1 << 17)
def split_suffix(last_name: str) -> tuple[str, str]:
    """Split a generational suffix off a last name: ``"O'Brien Jr."`` -> ``("obrien", "jr")``.

    The suffix stays a separate key component, so a Jr and a Sr at one address do not collide
    when both sides record it. A lone suffix-like word (a surname "Junior") is kept as the name.
    Returns ``("", "")`` when no name remains.
    """
    name = normalize_name(last_name)
    head, sep, tail = name.rpartition(" ")
    if sep and head:
        canonical = _SUFFIXES.get(tail)
        if canonical is not None:
            return head, canonical
    return name, ""


def normalize_address(s: str) -> str:
    """Canonical street line; ``""`` when nothing usable remains.

    NFKC/accent folding, casefold, punctuation to spaces, "#" and unit designators (apartment,
    apt, unit, suite, ste) to ``apt``, USPS street suffixes (STREET->st, AVENUE->ave, ...),
    directionals (NORTH->n ... SOUTHWEST->sw), ordinal words (FIRST->1st) and PO boxes
    (P.O. Box -> po box). Placeholder detection is separate: see :func:`address_problem`.
    """
    return _address_tokens(s)[0] if s else ""


def _address_tokens(s: str) -> tuple[str, list[str]]:
    """(normalized line, its tokens); the classifier needs both, so split only once."""
    if not s.isascii():
        s = unicodedata.normalize("NFKC", s)  # full-width number sign -> "#"
    if "#" in s:
        s = s.replace("#", " apt ")
    if "." in s:
        s = _DOTTED_INITIALS_RE.sub("", s)  # "N.W." -> "NW.", "P.O." -> "PO."
    get = _ADDRESS_TOKENS.get
    tokens = [get(t, t) for t in _fold(s).split()]
    line = " ".join(tokens)
    if "apt apt" in line or "box" in line:
        line = _REPEATED_UNIT_RE.sub(_UNIT_CANONICAL, line)  # "Apt #4" -> "apt 4"
        line = _PO_BOX_RE.sub("po box", line)
        tokens = line.split()
    return line, tokens


_PLACEHOLDER_PHRASES = frozenset(normalize_address(p) for p in _PLACEHOLDER_PHRASES_RAW) - {""}
_PLACEHOLDER_WORDS = frozenset(
    tok for phrase in _PLACEHOLDER_PHRASES for tok in phrase.split()
) | frozenset(normalize_address(w) for w in _PLACEHOLDER_EXTRA_WORDS)


_NON_STREET_WORDS = _PLACEHOLDER_WORDS | _ZIP_WORDS | _US_STATES | {_UNIT_CANONICAL}
# Suffixes and directionals alone do not name a street ("Unknown St" names nothing).
_SUFFIX_WORDS = frozenset(_STREET_SUFFIXES) | frozenset(_DIRECTIONALS.values()) | {"way"}
_FAST_NON_STREET_WORDS = _NON_STREET_WORDS | _SUFFIX_WORDS
# Placeholder words long enough not to be an initial or a directional ("n", "a", "na").
_STRONG_PLACEHOLDER_WORDS = frozenset(w for w in _PLACEHOLDER_WORDS if len(w) >= 3)


def _classify_address(
    address: str, city: str, state: str
) -> tuple[str, tuple[ReasonCode, str] | None]:
    """(normalized street line, problem or None); one normalization serves both uses."""
    if not address or address.isspace():
        return "", (ReasonCode.MISSING_ADDRESS, "address is blank")
    line, token_list = _address_tokens(address)
    if not line:
        return line, (
            ReasonCode.PLACEHOLDER_ADDRESS,
            f"address {address!r} has no letters or digits",
        )
    if line in _PLACEHOLDER_PHRASES:
        return line, (ReasonCode.PLACEHOLDER_ADDRESS, f"address {address!r} is a placeholder")
    # Fast path (almost every real address): some token is a word that is neither a
    # placeholder, a ZIP keyword, a state code, a unit designator, a street suffix or
    # directional, digits, nor a word of the record's own city/state.
    place: frozenset[str] | None = None
    for tok in token_list:
        if tok in _FAST_NON_STREET_WORDS or tok.isdigit():
            continue
        if place is None:
            place = _place_tokens(city, state)
        if tok not in place:
            return line, None
    return line, _address_refusal(address, set(token_list), city, state)


def _address_refusal(
    address: str, tokens: set[str], city: str, state: str
) -> tuple[ReasonCode, str] | None:
    """Slow path of :func:`_classify_address`: name the exact problem, or accept."""
    if tokens <= _PLACEHOLDER_WORDS:
        return ReasonCode.PLACEHOLDER_ADDRESS, f"address {address!r} is only placeholder words"
    rest = tokens - _ZIP_WORDS
    if not rest:
        return ReasonCode.PLACEHOLDER_ADDRESS, f"address {address!r} is a placeholder"
    if "".join(rest).isdigit():
        return ReasonCode.ZIP_ONLY_ADDRESS, f"address {address!r} is only a ZIP or digits"
    if _UNIT_CANONICAL in rest:
        street = rest - {_UNIT_CANONICAL}
        if not street or "".join(street).isdigit():
            return ReasonCode.PLACEHOLDER_ADDRESS, f"address {address!r} is only a unit designator"
    words = {t for t in rest if not t.isdigit()}
    numbers = [t for t in rest if t.isdigit()]
    if (
        not numbers
        and words & _STRONG_PLACEHOLDER_WORDS
        and words <= _PLACEHOLDER_WORDS | _SUFFIX_WORDS
    ):
        return ReasonCode.PLACEHOLDER_ADDRESS, f"address {address!r} names no street"
    if words <= _NON_STREET_WORDS | _place_tokens(city, state):
        # No street word at all: only the record's own city/state, state codes, placeholder
        # words and numbers. With a ZIP among the numbers this is the ZIP-only case again.
        if not numbers:
            return (
                ReasonCode.MISSING_ADDRESS,
                f"address {address!r} has no street line, only city/state",
            )
        if any(len(t) in (5, 9) for t in numbers) and all(len(t) in (4, 5, 9) for t in numbers):
            return (
                ReasonCode.ZIP_ONLY_ADDRESS,
                f"address {address!r} has no street line, only city/state/ZIP",
            )
    return None


@lru_cache(maxsize=1 << 15)
def _place_tokens(city: str, state: str) -> frozenset[str]:
    """Normalized words of a record's city and state (cities repeat, so this is cached)."""
    return frozenset(normalize_address(city).split()) | frozenset(normalize_address(state).split())


def address_problem(
    address: str, *, city: str = "", state: str = ""
) -> tuple[ReasonCode, str] | None:
    """Why ``address`` is not a usable street line, or ``None`` if it is.

    Blank, or only the record's own city/state ("Washington, DC") -> MISSING_ADDRESS.
    Punctuation only ("-", "."), a known placeholder phrase
    ("Failed to Provide", "N/A"), or only placeholder words ("NA NA", "Unknown Unknown") ->
    PLACEHOLDER_ADDRESS. Only digits, only a ZIP/ZIP+4 ("zip 20500"), or only ZIP plus the
    record's own city/state ("Washington DC 20500") -> ZIP_ONLY_ADDRESS.
    """
    return _classify_address(address, city, state)[1]


_DOB_ISO_RE = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})", re.ASCII)
_DOB_COMPACT_RE = re.compile(r"(\d{4})(\d{2})(\d{2})", re.ASCII)
_DOB_US_RE = re.compile(r"(\d{1,2})([/-])(\d{1,2})\2(\d{4})", re.ASCII)
_MIN_YEAR = 1900


@lru_cache(maxsize=1 << 16)
def _parse_dob(s: str) -> tuple[date | None, str]:
    """(date, "") for a parseable, real date from 1900 on; else (None, why). Cached."""
    s = s.strip()
    if not s or not s.isascii():
        return None, "not a date"
    m = _DOB_ISO_RE.fullmatch(s) or _DOB_COMPACT_RE.fullmatch(s)
    if m is not None:
        y, mo, d = int(m[1]), int(m[2]), int(m[3])
    else:
        m = _DOB_US_RE.fullmatch(s)
        if m is None:
            return None, "not a date in a supported format"
        y, mo, d = int(m[4]), int(m[1]), int(m[3])
    try:
        parsed = date(y, mo, d)
    except ValueError:
        return None, "not a calendar date"
    if y < _MIN_YEAR:
        return None, f"before {_MIN_YEAR}"
    return parsed, ""


def _dob_check(s: str, today: date) -> tuple[date | None, str]:
    parsed, why = _parse_dob(s)
    if parsed is not None and parsed > today:
        return None, "in the future"
    return parsed, why


def normalize_dob(s: str, *, today: date) -> str | None:
    """ISO ``YYYY-MM-DD`` from YYYY-MM-DD, YYYYMMDD, MM/DD/YYYY, M/D/YYYY or MM-DD-YYYY.

    ``None`` when blank, unparseable, not a calendar date, before 1900 or after ``today``.
    """
    parsed = _dob_check(s, today)[0]
    return None if parsed is None else parsed.isoformat()


_ITIN_GROUPS = frozenset(
    f"{g:02d}" for lo, hi in ((50, 65), (70, 88), (90, 92), (94, 99)) for g in range(lo, hi + 1)
)


_TIN_RE = re.compile(r"(\d{3})([- ]?)(\d{2})\2(\d{4})", re.ASCII)
_ZIP_RE = re.compile(r"(\d{5})(?:[- ]?\d{4})?", re.ASCII)


def normalize_tin(s: str) -> str | None:
    """Nine ASCII digits of an SSN or ITIN; ``None`` when blank or malformed.

    Accepts "123456789", "123-45-6789" and "123 45 6789". SSN: area not 000, 666 or 9xx;
    group not 00; serial not 0000. ITIN: area 9xx with digits 4-5 in 50-65, 70-88, 90-92 or
    94-99.
    """
    if len(s) == 11 and s[3] == "-" == s[6]:  # the common dashed form, without the regex
        s = s[:3] + s[4:6] + s[7:]
        if not (s.isascii() and s.isdigit()):
            return None
    elif len(s) != 9 or not (s.isascii() and s.isdigit()):
        m = _TIN_RE.fullmatch(s.strip())
        if m is None:
            return None
        s = m[1] + m[3] + m[4]
    area, group = s[:3], s[3:5]
    if area[0] == "9":
        return s if group in _ITIN_GROUPS else None
    if area == "000" or area == "666" or group == "00" or s[5:] == "0000":
        return None
    return s


def normalize_zip(s: str) -> str | None:
    """The 5-digit ZIP from a ZIP or ZIP+4 ("20500", "20500-0003"); ``None`` if malformed.

    A 4-digit value (a ZIP that lost its leading zero in a spreadsheet) is refused rather than
    guessed, and so is the non-existent ZIP 00000.
    """
    if len(s) != 5 or not (s.isascii() and s.isdigit()):
        m = _ZIP_RE.fullmatch(s.strip())
        if m is None:
            return None
        s = m[1]
    return s if s != "00000" else None


_TAX_PERIOD_RE = re.compile(r"(\d{4})(?:[Qq]([1-4]))?", re.ASCII)


def normalize_tax_period(s: str, *, today: date) -> str | None:
    """``"YYYY"`` or ``"YYYYQn"`` for a year 1900..current (a quarter must have begun)."""
    return _tax_period(s, today)


@lru_cache(maxsize=1 << 12)
def _tax_period(s: str, today: date) -> str | None:
    m = _TAX_PERIOD_RE.fullmatch(s.strip())
    if m is None:
        return None
    year = int(m[1])
    if year < _MIN_YEAR or year > today.year:
        return None
    if m[2] is None:
        return m[1]
    quarter = int(m[2])
    if year == today.year and quarter > (today.month - 1) // 3 + 1:
        return None
    return f"{m[1]}Q{quarter}"


def _fold_place(s: str) -> str:
    return " ".join(_fold(s).split()) if s else ""


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

_BLANKISH = frozenset({"", "n a", "na", "none", "null", "tbd", "unknown", "xxx"})


@lru_cache(maxsize=1 << 12)
def _is_blankish(s: str) -> bool:
    """Blank, punctuation-only, or a bare placeholder ("N/A", "TBD") — no real statute/reason."""
    return _fold_place(s) in _BLANKISH


def _person_refusals(p: PersonRecord, line: int, today: date, out: list[Refusal]) -> None:
    rid = p.record_id
    if not rid.strip():
        out.append(Refusal(rid, line, ReasonCode.MISSING_RECORD_ID, "record_id is blank"))
    if p.tin.strip() and normalize_tin(p.tin) is None:
        out.append(
            Refusal(rid, line, ReasonCode.MALFORMED_TIN, "tin is not a well-formed SSN or ITIN")
        )
    if p.dob.strip():
        parsed, why = _dob_check(p.dob, today)
        if parsed is None:
            out.append(Refusal(rid, line, ReasonCode.IMPOSSIBLE_DOB, f"dob {p.dob!r}: {why}"))


def validate_person(p: PersonRecord, *, line: int = 0, today: date) -> list[Refusal]:
    """Custodian-side check: record_id present, TIN and DOB well-formed when present.

    Lighter than :func:`validate_query` because a custodian row lacking an address is still a
    legitimate record; it simply never yields an address key.
    """
    out: list[Refusal] = []
    _person_refusals(p, line, today, out)
    return out


def validate_query(q: QueryRecord, *, today: date, line: int = 0) -> list[Refusal]:
    """Requester/authority-side check of one subject; empty list means acceptable.

    At most one refusal per reason code. Duplicate record ids need the whole batch and are
    detected by :func:`validate_queries`.
    """
    p, meta = q.person, q.metadata
    rid = p.record_id
    out: list[Refusal] = []
    _person_refusals(p, line, today, out)

    no_first = not normalize_name(p.first_name)
    no_last = not split_suffix(p.last_name)[0]
    if no_first or no_last:
        which = (
            "first_name and last_name"
            if no_first and no_last
            else ("first_name" if no_first else "last_name")
        )
        out.append(Refusal(rid, line, ReasonCode.MISSING_NAME, f"{which} blank"))

    problem = _classify_address(p.address, p.city, p.state)[1]
    if problem is not None:
        out.append(Refusal(rid, line, problem[0], problem[1]))

    if normalize_zip(p.zip) is None:
        why = "zip is blank" if not p.zip.strip() else f"zip {p.zip!r} is not 5 or 9 digits"
        out.append(Refusal(rid, line, ReasonCode.MALFORMED_ZIP, why))

    periods = [t for t in meta.tax_periods if t.strip()]
    if not periods:
        out.append(Refusal(rid, line, ReasonCode.MISSING_TAX_PERIODS, "no tax periods"))
    else:
        bad = [t for t in periods if _tax_period(t, today) is None]
        if bad:
            out.append(
                Refusal(
                    rid,
                    line,
                    ReasonCode.MALFORMED_TAX_PERIOD,
                    "tax periods not a year 1900..current or YYYYQn: " + ", ".join(bad),
                )
            )
    if _is_blankish(meta.statute):
        out.append(
            Refusal(rid, line, ReasonCode.MISSING_STATUTE, "statute is blank or a placeholder")
        )
    if _is_blankish(meta.reason):
        out.append(
            Refusal(rid, line, ReasonCode.MISSING_REASON, "reason is blank or a placeholder")
        )
    return out


def _duplicate_groups(items: Sequence[tuple[int, PersonRecord]]) -> dict[int, list[int]]:
    """Item index -> lines of every item sharing its (stripped, non-blank) record_id."""
    counts = Counter(p.record_id.strip() for _, p in items)
    shared: dict[str, list[int]] = {}
    groups: dict[int, list[int]] = {}
    for index, (line, p) in enumerate(items):
        rid = p.record_id.strip()
        if rid and counts[rid] > 1:
            group = shared.setdefault(rid, [])
            group.append(line)
            groups[index] = group  # the shared list is complete once the loop ends
    return groups


def _dup_refusal(p: PersonRecord, line: int, group: list[int]) -> Refusal:
    others = list(islice((o for o in group if o != line), 6))
    shown = ", ".join(map(str, others[:5])) + (" ..." if len(others) > 5 else "")
    return Refusal(
        p.record_id,
        line,
        ReasonCode.DUPLICATE_RECORD_ID,
        f"record_id also on line(s) {shown}; every occurrence is refused",
    )


def validate_queries(
    queries_with_lines: Iterable[tuple[int, QueryRecord]], *, today: date
) -> ValidationReport:
    """Validate a batch of ``(line, query)`` pairs, as from :func:`read_query_csv_with_lines`.

    Adds duplicate-id detection: *every* occurrence of a repeated record_id is refused, since a
    result could otherwise be attributed to the wrong subject. Plain lists of queries can be
    passed as ``enumerate(queries, 1)``. ``accepted`` is a :class:`ValidatedQueries`, what a
    requester session takes.
    """
    items = list(queries_with_lines)
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int)):
            raise TypeError("validate_queries takes (line, QueryRecord) pairs, e.g. "
                            f"enumerate(queries, 1); got {type(item).__name__}")
        if not isinstance(item[1], QueryRecord):
            raise TypeError(_not_a_query(item[1], f"the query on line {item[0]}"))
    dupes = _duplicate_groups([(ln, q.person) for ln, q in items])
    accepted: list[QueryRecord] = []
    report = ValidationReport(accepted=ValidatedQueries((), _VALIDATED), refused=[],
                              input_count=len(items))
    for index, (line, q) in enumerate(items):
        refusals = validate_query(q, today=today, line=line)
        group = dupes.get(index)
        if group is not None:
            refusals.append(_dup_refusal(q.person, line, group))
        if refusals:
            report.refused.extend(refusals)
        else:
            accepted.append(q)
            report.accepted_lines.append(line)
    report.accepted = ValidatedQueries(accepted, _VALIDATED)
    return report


def validate_persons(
    persons_with_lines: Iterable[tuple[int, PersonRecord]], *, today: date
) -> tuple[list[PersonRecord], list[Refusal]]:
    """Custodian batch check: ``(usable records, refusals)``; duplicate ids are refused too."""
    items = list(persons_with_lines)
    dupes = _duplicate_groups(items)
    accepted: list[PersonRecord] = []
    refused: list[Refusal] = []
    for index, (line, p) in enumerate(items):
        refusals = validate_person(p, line=line, today=today)
        group = dupes.get(index)
        if group is not None:
            refusals.append(_dup_refusal(p, line, group))
        if refusals:
            refused.extend(refusals)
        else:
            accepted.append(p)
    return accepted, refused


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------


_PERSON_COLUMNS = (*PERSON_FIELDS, RECORD_CLASS_FIELD)
_QUERY_COLUMNS = (*PERSON_FIELDS, *QUERY_META_FIELDS, RECORD_CLASS_FIELD)

#: Columns every query file needs whatever its rules: each subject is reviewed on its name,
#: address and ZIP (placeholder and ZIP-only addresses are refused) and on its legal basis.
QUERY_REVIEW_COLUMNS: tuple[str, ...] = (
    "record_id", "first_name", "last_name", "address", "zip", *QUERY_META_FIELDS,
)

CSV_SCHEMA_HELP = """\
CSV input files: UTF-8, comma-separated, one header row, columns in any order.
  columns:   record_id,tin,first_name,last_name,dob,address,city,state,zip
             (+ tax_periods,statute,reason in a requester's query file;
              + record_class in a custodian's file, e.g. "protected")
  required:  record_id always; a query file also first_name,last_name,address,zip,
             tax_periods,statute,reason (every subject is reviewed on them)
  per rule:  tin+dob -> tin,dob   tin+last_name -> tin,last_name
             first+last+dob+zip -> first_name,last_name,dob,zip
             first+last+address -> first_name,last_name,address,zip
             typo-tolerant rules read the same columns: tin+dob+variants -> tin,dob
             tin+last_phonetic -> tin,last_name   tin+first_phonetic -> tin,first_name
             tin+zip -> tin,zip   tin+last_phonetic+zip -> tin,last_name,zip
             names_phonetic+dob(+zip) -> first_name,last_name,dob(,zip)
             (a custodian file needs every column of at least one rule)
  optional:  any column no chosen rule needs: city and state only help spot an address
             that is just a city/state; other extra columns are kept (disclosable only
             when an authorization names them, e.g. tax_paid_cents)
  formats:   tin 123-45-6789 or 123456789 (SSN or ITIN); dob YYYY-MM-DD, YYYYMMDD or
             MM/DD/YYYY; zip 12345 or 12345-6789; tax_periods years (2023) or quarters
             (2023Q4) separated by ';' or ',' and/or spaces ("2022;2023Q4", "2022, 2023")"""


def rule_columns(rule_id: str) -> tuple[str, ...]:
    """CSV columns a match rule reads (an address key also needs the ZIP)."""
    fields = get_rule(rule_id).fields
    return tuple(dict.fromkeys(c for f in fields for c in field_columns(f)))


_HEADER_SHOWN = 160  # characters of a bad header quoted back


def _header_error(kind: str, schema: Sequence[str], header: Sequence[str], why: str) -> str:
    """The bad-header message: what is wrong and the whole expected header on its first line
    (short enough for a gRPC status), then the schema."""
    got = ",".join(header)
    got = got if len(got) <= _HEADER_SHOWN else got[:_HEADER_SHOWN] + "..."
    return (f"CSV header of the {kind} lacks {why}; expected {','.join(schema)} (extra "
            f"columns allowed); got {got}\n{CSV_SCHEMA_HELP}")


def _check_header(
    header: Sequence[str], schema: Sequence[str], rules: Iterable[str] | None
) -> None:
    """Refuse a header without the columns the file's use needs (see CSV_SCHEMA_HELP).

    A query file always needs its review columns; ``rules`` (when the caller knows them)
    add theirs. A custodian file without known rules must serve at least one rule.
    """
    is_query = QUERY_META_FIELDS[0] in schema
    kind = "query file" if is_query else "custodian records"
    present = set(header)
    needed = {"record_id"} | (set(QUERY_REVIEW_COLUMNS) if is_query else set())
    for rule_id in rules or ():
        needed.update(rule_columns(rule_id))
    missing = [c for c in schema if c in needed and c not in present]
    if missing:
        raise InvalidRecordError(
            _header_error(kind, schema, header, "required columns " + ",".join(missing)))
    if rules is None and not is_query and not any(
        present.issuperset(rule_columns(r)) for r in MATCH_RULES
    ):
        raise InvalidRecordError(_header_error(
            kind, schema, header, "required columns: the columns of at least one match rule"))


def _iter_rows(
    source: TextIO, schema: Sequence[str], rules: Iterable[str] | None = None
) -> Iterator[tuple[int, tuple[str, ...], tuple[tuple[str, str], ...]]]:
    """Yield (line, schema values in ``schema`` order, extras) per non-blank data row.

    Which ``schema`` columns are required is :func:`_check_header`'s; an absent optional
    column reads as "" (so a rule needing it yields no key). Columns outside ``schema``
    become extras in header order.
    """
    reader = csv.reader(source)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise InvalidRecordError(
            f"CSV is empty: a header row is required\n{CSV_SCHEMA_HELP}") from None
    if len(set(header)) != len(header):
        raise InvalidRecordError(f"CSV header has duplicate columns: {header}")
    if "" in header:
        raise InvalidRecordError("CSV header has an empty column name")
    _check_header(header, schema, None if rules is None else list(rules))
    width = len(header)
    # A missing optional column reads from a padding cell appended to every row.
    index = [header.index(c) if c in header else width for c in schema]
    pick = itemgetter(*index)
    extra_idx = [(i, h) for i, h in enumerate(header) if h not in schema]
    previous_end = reader.line_num
    try:
        for row in reader:
            line = previous_end + 1
            previous_end = reader.line_num
            if not row:
                continue  # a blank line is not a record
            if len(row) != width:
                raise InvalidRecordError(
                    f"CSV line {line}: {len(row)} columns, header has {width}"
                )
            row.append("")
            extras = tuple([(h, row[i]) for i, h in extra_idx]) if extra_idx else ()
            yield line, pick(row), extras
    except csv.Error as exc:
        raise InvalidRecordError(f"CSV line {previous_end + 1}: {exc}") from exc


def iter_person_csv(source: TextIO) -> Iterator[tuple[int, PersonRecord]]:
    """Stream ``(line, record)`` pairs, so a 1.3M-row file never sits in memory twice."""
    for line, values, extras in _iter_rows(source, _PERSON_COLUMNS):
        # values holds exactly the person columns, in field order (checked by _iter_rows)
        yield line, PersonRecord(*values, extras)  # type: ignore[arg-type, call-arg]


def read_person_csv_with_lines(source: TextIO) -> list[tuple[int, PersonRecord]]:
    """``(line, record)`` for each data row; raises InvalidRecordError on a malformed file."""
    return list(iter_person_csv(source))


def read_person_csv(source: TextIO) -> list[PersonRecord]:
    """Person records from a CSV whose header holds record_id and the columns of a match rule.

    Absent person columns and ``record_class`` read as ""; every other column (even
    ``tax_periods`` of a query file) is kept in ``extra`` in header order. Values are kept
    verbatim, never stripped.
    """
    return [p for _, p in read_person_csv_with_lines(source)]


def _split_periods(s: str) -> tuple[str, ...]:
    return tuple(t for t in _TAX_PERIOD_SPLIT.split(s) if t)


def iter_query_csv(
    source: TextIO, *, rules: Iterable[str] | None = None
) -> Iterator[tuple[int, QueryRecord]]:
    """Stream ``(line, query)`` pairs (a 1.28M-row request file never sits in memory twice).

    ``rules``, when the caller knows them, makes their columns required too.
    """
    for line, v, extras in _iter_rows(source, _QUERY_COLUMNS, rules):
        person = PersonRecord(*v[:9], v[12], extras)  # type: ignore[arg-type, call-arg]
        yield line, QueryRecord(person, QueryMetadata(_split_periods(v[9]), v[10], v[11]))


def read_query_csv_with_lines(
    source: TextIO, *, rules: Iterable[str] | None = None
) -> list[tuple[int, QueryRecord]]:
    """``(line, query)`` for each data row; feed straight into :func:`validate_queries`.

    ``tax_periods`` is a list separated by ";", "," and/or spaces ("2022;2023", "2022, 2023");
    empty entries are ignored. Other columns behave as in :func:`read_person_csv`.
    """
    return list(iter_query_csv(source, rules=rules))


def read_query_csv(source: TextIO) -> list[QueryRecord]:
    """Query records (person fields + tax_periods, statute, reason) from a CSV."""
    return [q for _, q in read_query_csv_with_lines(source)]


def _extra_columns(persons: Sequence[PersonRecord], reserved: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for p in persons:
        keys = [key for key, _ in p.extra]
        if len(set(keys)) != len(keys):
            raise ValueError(f"record {p.record_id!r} repeats an extra column")
        for key in keys:
            if key in reserved:
                raise ValueError(f"extra column {key!r} clashes with a schema column")
            if not key or key != key.strip():
                raise ValueError(f"extra column name {key!r} would not survive a CSV header")
            seen.setdefault(key, None)
    return list(seen)


def _write(
    dest: TextIO,
    persons: Sequence[PersonRecord],
    meta_rows: Sequence[list[str]] | None,
) -> None:
    extras = _extra_columns(persons, _PERSON_COLUMNS if meta_rows is None else _QUERY_COLUMNS)
    with_class = any(p.record_class for p in persons)
    header = [*PERSON_FIELDS]
    if meta_rows is not None:
        header += QUERY_META_FIELDS
    if with_class:
        header.append(RECORD_CLASS_FIELD)
    header += extras
    writer = csv.writer(dest, lineterminator="\r\n")
    writer.writerow(header)
    for i, p in enumerate(persons):
        row = [
            p.record_id,
            p.tin,
            p.first_name,
            p.last_name,
            p.dob,
            p.address,
            p.city,
            p.state,
            p.zip,
        ]
        if meta_rows is not None:
            row += meta_rows[i]
        if with_class:
            row.append(p.record_class)
        if extras:
            own = dict(p.extra)
            row += [own.get(k, "") for k in extras]
        writer.writerow(row)


def write_person_csv(records: Iterable[PersonRecord], dest: TextIO) -> None:
    """Write records so that :func:`read_person_csv` returns them unchanged.

    Exact when every record has the same extra columns in the same order (always true for
    records read from one CSV); otherwise missing extras are written as "".
    """
    _write(dest, list(records), None)


def write_query_csv(queries: Iterable[QueryRecord], dest: TextIO) -> None:
    """Write queries so that :func:`read_query_csv` returns them unchanged.

    Raises ValueError for a tax period that could not survive the ";"-joined column (empty,
    or containing a separator: ";", "," or whitespace) rather than altering it silently.
    """
    qs = list(queries)
    meta_rows: list[list[str]] = []
    for q in qs:
        for t in q.metadata.tax_periods:
            if not t or _TAX_PERIOD_SPLIT.search(t):
                raise ValueError(f"tax period {t!r} cannot be written to a ';'-separated list")
        meta_rows.append(
            [_TAX_PERIOD_SEP.join(q.metadata.tax_periods), q.metadata.statute, q.metadata.reason]
        )
    _write(dest, [q.person for q in qs], meta_rows)


# --------------------------------------------------------------------------------------------
# Match rules and match-key encoding
# --------------------------------------------------------------------------------------------

#: Domain-separation tag of every match key (distinct from every other hash/KDF input).
MATCH_KEY_DST = b"gated-psi/match-key/v2"
#: Longest component accepted: no real name, address or place is near it, so longer is garbage.
_MAX_COMPONENT = 0xFFFF
_TIN_PREFIX = u64(9)  # length prefixes of the two fixed-width components, built once
_DOB_PREFIX = u64(10)


class Strength(IntEnum):
    """How unlikely a rule is to misidentify a person; policy sets a minimum."""

    WEAK = 1
    MEDIUM = 2
    STRONG = 3


def _component(value: str) -> bytes | None:
    """One canonically length-prefixed component, or None if it is implausibly long."""
    raw = value.encode("utf-8")
    if len(raw) > _MAX_COMPONENT:
        return None
    # lp(raw), inlined: this runs once per field per record (millions of times per index)
    return len(raw).to_bytes(LENGTH_BYTES, "big") + raw


def _rule_prefix(rule_id: str) -> bytes:
    raw = rule_id.encode("utf-8")
    if not 1 <= len(raw) <= 0xFF:
        raise ValueError("rule_id must be 1..255 UTF-8 bytes")
    return encode(MATCH_KEY_DST, raw)


def encode_match_key(rule_id: str, components: Sequence[str]) -> bytes:
    """``encode(MATCH_KEY_DST, rule_id, *components)`` (protocol.crypto.encoding): injective.

    The canonical encoding parses back to exactly one (rule_id, components) pair (see
    :func:`decode_match_key`), so distinct inputs can never share a key.
    """
    parts = [_rule_prefix(rule_id)]
    for v in components:
        enc = _component(v)
        if enc is None:
            raise ValueError("match-key component longer than 65535 bytes")
        parts.append(enc)
    return b"".join(parts)


def decode_match_key(key: bytes) -> tuple[str, tuple[str, ...]]:
    """Inverse of :func:`encode_match_key`; for audits and tests. Raises ValueError."""
    parts = decode(key)
    if len(parts) < 2 or parts[0] != MATCH_KEY_DST or not parts[1]:
        raise ValueError("not a match key")
    rule_id, *comps = (p.decode("utf-8") for p in parts[1:])
    return rule_id, tuple(comps)


# Per-field component encoders: each returns the length-prefixed component bytes of a field
# (one or more components), or None when the field is missing or invalid. Repeated values are
# cached; TINs are unique per person so caching them would only cost memory.


@lru_cache(maxsize=1 << 17)
def _first_part(raw: str) -> bytes | None:
    name = normalize_name(raw)
    return _component(name) if name else None


@lru_cache(maxsize=1 << 17)
def _last_part(raw: str) -> bytes | None:
    name, suffix = split_suffix(raw)
    if not name:
        return None
    enc = _component(name)
    return None if enc is None else enc + lp(suffix)


@lru_cache(maxsize=1 << 16)
def _dob_part(raw: str) -> tuple[date, bytes] | None:
    parsed = _parse_dob(raw)[0]
    if parsed is None:
        return None
    return parsed, _DOB_PREFIX + parsed.isoformat().encode("ascii")


@lru_cache(maxsize=1 << 16)
def _zip_part(raw: str) -> bytes | None:
    z = normalize_zip(raw)
    return None if z is None else _component(z)


def _tin_bytes(raw: str) -> bytes | None:
    tin = normalize_tin(raw)
    return None if tin is None else _TIN_PREFIX + tin.encode("ascii")


#: Below this many values the per-value path is cheaper than building arrays.
_ARRAY_COLUMN_MIN = 256
_DIGITS_OF_DASHED = [0, 1, 2, 4, 5, 7, 8, 9, 10]  # "ddd-dd-dddd" without its dashes
_ITIN_GROUP_TABLE = np.zeros(100, dtype=bool)
_ITIN_GROUP_TABLE[[int(g) for g in _ITIN_GROUPS]] = True


def _code_points(values: Sequence[str], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each value's length, and its first ``width`` code points as an (n, width) array
    (0 past a shorter value's end): what the array paths of a column read."""
    n = len(values)
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=n)
    chars = np.array(values, dtype=f"U{width}").view(np.uint32).reshape(n, width)
    return lengths, chars


def _column_rows(prefix: bytes, body: np.ndarray, plain: np.ndarray, valid: np.ndarray,
                 per_value: Callable[[int], bytes | None]) -> list[bytes | None]:
    """``prefix || body`` for each plain, valid row; None for a plain, invalid row; and
    ``per_value(i)`` for every other row (the form the array path does not read).

    A plain row's body ends in an ASCII digit, so reading it as bytes drops no trailing
    NUL; every other row is replaced.
    """
    encoded = np.empty((body.shape[0], len(prefix) + body.shape[1]), dtype=np.uint8)
    encoded[:, :len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    encoded[:, len(prefix):] = body.astype(np.uint8)
    rows: list[bytes | None] = encoded.view(f"S{encoded.shape[1]}").ravel().tolist()
    for i in np.flatnonzero(~plain).tolist():
        rows[i] = per_value(i)
    for i in np.flatnonzero(plain & ~valid).tolist():
        rows[i] = None
    return rows


def _tin_column(values: Sequence[str]) -> list[bytes | None]:
    """``[_tin_bytes(v) for v in values]``, with the two plain forms done as arrays.

    A million-query file is almost all "ddd-dd-dddd" or nine digits; those are checked and
    encoded as whole columns (digits, SSN and ITIN ranges as in ``normalize_tin``). Any
    other value, e.g. with blanks around it, takes ``_tin_bytes`` itself, so the answer
    is the per-value one for every input (pinned by a test).
    """
    if len(values) < _ARRAY_COLUMN_MIN:
        return [_tin_bytes(v) for v in values]
    lengths, chars = _code_points(values, 11)
    dashed = (lengths == 11) & (chars[:, 3] == 0x2D) & (chars[:, 6] == 0x2D)
    digits = np.where(dashed[:, None], chars[:, _DIGITS_OF_DASHED], chars[:, :9])
    plain = dashed | (lengths == 9)
    plain &= ((digits >= 0x30) & (digits <= 0x39)).all(axis=1)
    d = (digits - 0x30).astype(np.int64)
    area = d[:, 0] * 100 + d[:, 1] * 10 + d[:, 2]
    group = d[:, 3] * 10 + d[:, 4]
    serial = ((d[:, 5] * 10 + d[:, 6]) * 10 + d[:, 7]) * 10 + d[:, 8]
    valid = np.where(area >= 900, _ITIN_GROUP_TABLE[np.clip(group, 0, 99)],
                     (area != 0) & (area != 666) & (group != 0) & (serial != 0))
    return _column_rows(_TIN_PREFIX, digits, plain, valid, lambda i: _tin_bytes(values[i]))


def _dob_bytes(raw: str, today: date) -> bytes | None:
    got = _dob_part(raw)
    return None if got is None or got[0] > today else got[1]


_ISO_DOB_DIGITS = [0, 1, 2, 3, 5, 6, 8, 9]  # "YYYY-MM-DD" without its dashes
_DAYS_IN_MONTH = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)


def _dob_column(values: Sequence[str], today: date) -> list[bytes | None]:
    """``[_dob_bytes(v, today) for v in values]``, with "YYYY-MM-DD" done as arrays.

    Files in bulk are almost all in the ISO form, which is already the encoding's text:
    those rows are checked as whole columns (a calendar date from 1900 on, not after
    ``today``) and prefixed. Any other value (other formats, blanks, one-digit parts) takes
    ``_dob_bytes`` itself, so the answer is the per-value one for every input (pinned by a
    test).
    """
    if len(values) < _ARRAY_COLUMN_MIN:
        return [_dob_bytes(v, today) for v in values]
    lengths, chars = _code_points(values, 10)
    digits = chars[:, _ISO_DOB_DIGITS]
    iso = (lengths == 10) & (chars[:, 4] == 0x2D) & (chars[:, 7] == 0x2D)
    iso &= ((digits >= 0x30) & (digits <= 0x39)).all(axis=1)
    d = (digits - 0x30).astype(np.int64)
    year = ((d[:, 0] * 10 + d[:, 1]) * 10 + d[:, 2]) * 10 + d[:, 3]
    month = d[:, 4] * 10 + d[:, 5]
    day = d[:, 6] * 10 + d[:, 7]
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    month_days = _DAYS_IN_MONTH[np.clip(month, 0, 12)] + (leap & (month == 2))
    valid = ((year >= _MIN_YEAR) & (month >= 1) & (month <= 12) & (day >= 1)
             & (day <= month_days)
             & (year * 10000 + month * 100 + day
                <= today.year * 10000 + today.month * 100 + today.day))
    return _column_rows(_DOB_PREFIX, chars, iso, valid, lambda i: _dob_bytes(values[i], today))


def _address_bytes(address: str, city: str, state: str, zip_code: str) -> bytes | None:
    z = _zip_part(zip_code)
    if z is None:
        return None
    line, problem = _classify_address(address, city, state)
    if problem is not None:
        return None
    enc = _component(line)
    return None if enc is None else enc + z


def _place_bytes(raw: str) -> bytes | None:
    folded = _fold_place(raw)
    return _component(folded) if folded else None


def _first_phonetic_code(raw: str) -> str:
    """Both sides' first-name code: nickname folded to its formal name, then NYSIIS."""
    return phonetic(first_name_canonical(normalize_name(raw)))


def _last_phonetic_code(raw: str) -> str:
    """Both sides' surname code: suffix dropped, compound parts joined, then NYSIIS."""
    return phonetic(surname_canonical(split_suffix(raw)[0]))


@lru_cache(maxsize=1 << 17)
def _first_phonetic_part(raw: str) -> bytes | None:
    code = _first_phonetic_code(raw)
    return _component(code) if code else None


@lru_cache(maxsize=1 << 17)
def _last_phonetic_part(raw: str) -> bytes | None:
    code = _last_phonetic_code(raw)
    return _component(code) if code else None


_Column = list[bytes | None]
#: A field name -> that field's raw values, one per record (PersonRecord attributes, or
#: columns cut straight out of packed storage without building records).
ColumnSource = Callable[[str], Sequence[str]]

# Column builders: one tight comprehension per field over all records (the bulk fast path).
_FIELD_COLUMNS: dict[str, Callable[[ColumnSource, date], _Column]] = {
    "tin": lambda col, _t: _tin_column(col("tin")),
    "dob": lambda col, t: _dob_column(col("dob"), t),
    "first_name": lambda col, _t: [_first_part(v) for v in col("first_name")],
    "last_name": lambda col, _t: [_last_part(v) for v in col("last_name")],
    "zip": lambda col, _t: [_zip_part(v) for v in col("zip")],
    "address": lambda col, _t: [
        _address_bytes(a, c, s, z)
        for a, c, s, z in zip(col("address"), col("city"), col("state"), col("zip"), strict=True)
    ],
    "city": lambda col, _t: [_place_bytes(v) for v in col("city")],
    "state": lambda col, _t: [_place_bytes(v) for v in col("state")],
    "first_phonetic": lambda col, _t: [_first_phonetic_part(v) for v in col("first_name")],
    "last_phonetic": lambda col, _t: [_last_phonetic_part(v) for v in col("last_name")],
}

#: Raw CSV columns each rule field reads, where that is not just the field itself.
_FIELD_SOURCES: dict[str, tuple[str, ...]] = {
    "address": ("address", "zip"),
    "first_phonetic": ("first_name",),
    "last_phonetic": ("last_name",),
}


def field_columns(field_name: str) -> tuple[str, ...]:
    """The CSV columns a rule field is computed from (an address key also needs the ZIP)."""
    return _FIELD_SOURCES.get(field_name, (field_name,))

#: Components each rule field contributes, in order. ``last_name`` is (name, suffix) so Jr and
#: Sr stay distinct; ``address`` is (normalized street line, zip5).
RULE_FIELDS: dict[str, tuple[str, ...]] = {
    "tin": ("tin",),
    "dob": ("dob",),
    "first_name": ("first_name",),
    "last_name": ("last_name", "suffix"),
    "zip": ("zip5",),
    "address": ("street", "zip5"),
    "city": ("city",),
    "state": ("state",),
    "first_phonetic": ("first_name_nysiis",),
    "last_phonetic": ("last_name_nysiis",),
}


class Variant(StrEnum):
    """A query-side variant a rule may evaluate beyond its canonical key.

    Each names one ordinary error undone on the requester's side only, so the custodian's
    tags stay one per record and rule while each variant costs the requester one budget
    unit (docs/architecture.md, Recall and misidentification).  A key carries at most one
    variant: errors are rare enough that two in one record are left to other rules.
    """

    TIN_TRANSPOSITION = "tin_transposition"  # two adjacent TIN digits swapped back
    DOB_SWAP = "dob_swap"  # day and month of the date of birth exchanged back
    NAME_ORDER = "name_order"  # first and last name exchanged back
    SURNAME_PART = "surname_part"  # one part of a compound surname alone
    NICKNAME = "nickname"  # each formal name an ambiguous nickname stands for
    ZIP_TRANSPOSITION = "zip_transposition"  # two adjacent ZIP digits swapped back
    DOB_TYPO = "dob_typo"  # the day off by one, or the decade off by one, undone


#: The rule field each variant alters (NAME_ORDER alters both names).
_VARIANT_FIELD: dict[Variant, tuple[str, ...]] = {
    Variant.TIN_TRANSPOSITION: ("tin",),
    Variant.DOB_SWAP: ("dob",),
    Variant.NAME_ORDER: ("first_phonetic", "last_phonetic"),
    Variant.SURNAME_PART: ("last_phonetic",),
    Variant.NICKNAME: ("first_phonetic",),
    Variant.ZIP_TRANSPOSITION: ("zip",),
    Variant.DOB_TYPO: ("dob",),
}


@dataclass(frozen=True)
class MatchRule:
    """An ordered set of normalized fields that, together, identify one person.

    ``variants`` are the query-side variants the requester also evaluates (see
    :class:`Variant`); the custodian only ever computes :meth:`match_key`.
    """

    rule_id: str
    fields: tuple[str, ...]
    strength: Strength
    description: str
    variants: frozenset[Variant] = frozenset()
    _prefix: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = [f for f in self.fields if f not in _FIELD_COLUMNS]
        if unknown or not self.fields:
            raise ValueError(f"match rule {self.rule_id!r}: unsupported fields {unknown}")
        for variant in self.variants:
            if not set(_VARIANT_FIELD[variant]) <= set(self.fields):
                raise ValueError(f"match rule {self.rule_id!r}: variant {variant} needs the "
                                 f"fields {', '.join(_VARIANT_FIELD[variant])}")
        object.__setattr__(self, "_prefix", _rule_prefix(self.rule_id))

    def match_key(self, record: PersonRecord, *, today: date) -> bytes | None:
        """The canonical match key of ``record`` (what the custodian's tag is made from), or
        None when any component is missing or invalid."""
        parts = [self._prefix]
        for f in self.fields:
            part = _FIELD_COLUMNS[f](lambda name: (getattr(record, name),), today)[0]
            if part is None:
                return None
            parts.append(part)
        return b"".join(parts)

    def match_keys(self, record: PersonRecord, *, today: date) -> list[bytes]:
        """Every key of ``record`` under this rule: the canonical key first, then each
        query-side variant that differs from it, without repeats ([] when unusable).

        This is what a requester evaluates, and its length is what the record costs in
        budget units.
        """
        return _variant_keys(self, record, self.match_key(record, today=today), today)


#: One key of a rule as its encoded components per field, in the rule's field order: the
#: key is the rule's prefix followed by these, joined.  Pricing and deduplication read the
#: fields from this directly instead of parsing the joined key back.
KeyRow = tuple[bytes, ...]
#: A variant's replacements for one record: per alternative, the encoded components of the
#: fields it alters (``_VARIANT_FIELD`` order).
_Alternatives = tuple[tuple[bytes, ...], ...]


def _tin_transposition_parts(record: PersonRecord, _today: date) -> _Alternatives:
    """Not cached: a TIN belongs to one person, so its transpositions never repeat."""
    tin = normalize_tin(record.tin)
    swapped = tin_transpositions(tin) if tin is not None else ()
    return tuple((_TIN_PREFIX + t.encode("ascii"),) for t in swapped
                 if normalize_tin(t) is not None)


@lru_cache(maxsize=1 << 16)
def _dob_alternative_parts(raw: str, today: date, typos: bool) -> _Alternatives:
    """Dates of birth repeat heavily across a file: each distinct one is expanded once."""
    parsed = _parse_dob(raw)[0]
    if parsed is None or parsed > today:
        return ()
    near = dob_typos(parsed) if typos else dob_swaps(parsed)
    return tuple((_DOB_PREFIX + d.isoformat().encode("ascii"),) for d in near if d <= today)


@lru_cache(maxsize=1 << 16)
def _zip_transposition_parts(raw: str) -> _Alternatives:
    zip5 = normalize_zip(raw)
    swapped = tin_transpositions(zip5) if zip5 is not None else ()
    return tuple((enc,) for z in swapped
                 if normalize_zip(z) is not None and (enc := _component(z)) is not None)


def _name_order_parts(record: PersonRecord, _today: date) -> _Alternatives:
    first = _first_phonetic_part(record.last_name)
    last = _last_phonetic_part(record.first_name)
    return () if first is None or last is None else ((first, last),)


@lru_cache(maxsize=1 << 17)
def _surname_part_parts(raw: str) -> _Alternatives:
    codes = (phonetic(p) for p in surname_parts(split_suffix(raw)[0]))
    return tuple((enc,) for code in codes if code and (enc := _component(code)) is not None)


@lru_cache(maxsize=1 << 17)
def _nickname_parts(raw: str) -> _Alternatives:
    formal = first_name_alternatives(normalize_name(raw))
    return tuple((enc,) for name in formal
                 if (code := phonetic(first_name_canonical(name)))
                 and (enc := _component(code)) is not None)


#: Per variant, its alternatives for one record (cached per distinct raw value where values
#: repeat: dates, ZIPs, names).
_VARIANT_PARTS: dict[Variant, Callable[[PersonRecord, date], _Alternatives]] = {
    Variant.TIN_TRANSPOSITION: _tin_transposition_parts,
    Variant.DOB_SWAP: lambda r, today: _dob_alternative_parts(r.dob, today, False),
    Variant.DOB_TYPO: lambda r, today: _dob_alternative_parts(r.dob, today, True),
    Variant.ZIP_TRANSPOSITION: lambda r, _today: _zip_transposition_parts(r.zip),
    Variant.NAME_ORDER: _name_order_parts,
    Variant.SURNAME_PART: lambda r, _today: _surname_part_parts(r.last_name),
    Variant.NICKNAME: lambda r, _today: _nickname_parts(r.first_name),
}


def _variant_keys(rule: MatchRule, record: PersonRecord, canonical: bytes | None,
                  today: date) -> list[bytes]:
    """The canonical key, then one key per query-side variant (deduplicated)."""
    if not rule.variants:
        return [] if canonical is None else [canonical]
    join = b"".join
    return [rule._prefix + join(row) for row in _record_rows(rule, record, today)]


def key_components(rule: MatchRule, record: PersonRecord, *, today: date
                   ) -> list[dict[str, bytes]]:
    """The encoded components of each of ``rule.match_keys(record)``, in the same order:
    what the misidentification estimate prices field by field."""
    return [dict(zip(rule.fields, row, strict=True))
            for row in _record_rows(rule, record, today)]


def key_rows_bulk(records: Sequence[PersonRecord], rule_ids: Sequence[str], *, today: date
                  ) -> dict[str, list[list[KeyRow]]]:
    """Per rule and record, each key of ``rule.match_keys(record)`` as a :data:`KeyRow`, in
    the same order: ``query_match_keys_bulk`` without joining the keys, for callers that read
    them field by field (the misidentification estimate).  Fields are normalized column by
    column and each variant expanded once per record, whichever rules share it."""
    raw: dict[str, list[str]] = {}

    def column(name: str) -> list[str]:
        if name not in raw:
            raw[name] = [getattr(r, name) for r in records]
        return raw[name]

    built: dict[str, _Column] = {}
    expanded: dict[Variant, list[_Alternatives]] = {}
    out: dict[str, list[list[KeyRow]]] = {}
    for rule in (get_rule(r) for r in dict.fromkeys(rule_ids)):
        for f in rule.fields:
            if f not in built:
                built[f] = _FIELD_COLUMNS[f](column, today)
        bases = zip(*(built[f] for f in rule.fields), strict=True)
        plan = _variant_plan(rule)
        for variant, _ in plan:
            if variant not in expanded:
                expanded[variant] = [_VARIANT_PARTS[variant](r, today) for r in records]
        out[rule.rule_id] = _expand(list(bases),
                                    [(at, expanded[variant]) for variant, at in plan])
    return out


@lru_cache(maxsize=64)  # one entry per rule
def _variant_plan(rule: MatchRule) -> tuple[tuple[Variant, tuple[int, ...]], ...]:
    """The rule's variants in key order, each with the positions of the fields it alters."""
    return tuple((variant, tuple(rule.fields.index(f) for f in _VARIANT_FIELD[variant]))
                 for variant in sorted(rule.variants))


def _record_rows(rule: MatchRule, record: PersonRecord, today: date) -> list[KeyRow]:
    """One record's keys under one rule as rows (the per-record path of key_rows_bulk)."""
    base = tuple(_FIELD_COLUMNS[f](lambda name: (getattr(record, name),), today)[0]
                 for f in rule.fields)
    return _expand([base], [(at, [_VARIANT_PARTS[variant](record, today)])
                            for variant, at in _variant_plan(rule)])[0]


def _expand(bases: list[tuple[bytes | None, ...]],
            variants: Sequence[tuple[tuple[int, ...], Sequence[_Alternatives]]]
            ) -> list[list[KeyRow]]:
    """Per record: its canonical row, then one row per alternative of each variant (given
    per variant as the positions it alters and its alternatives per record), without
    repeats and without rows that miss a component.  Equal rows are equal keys (each
    field's components are length-prefixed), so this keeps the first of each key, as
    joining first would.  Variant by variant over all records: most records have no
    alternative for most variants."""
    out = [[base] for base in bases]
    for at, per_record in variants:
        if len(at) == 1:
            i, j = at[0], at[0] + 1
            for rows, alternatives in zip(out, per_record, strict=True):
                if alternatives:
                    head, tail = rows[0][:i], rows[0][j:]
                    rows.extend([head + alt + tail for alt in alternatives])
            continue
        for rows, alternatives in zip(out, per_record, strict=True):
            for alt in alternatives:
                row = list(rows[0])
                for i, part in zip(at, alt, strict=True):
                    row[i] = part
                rows.append(tuple(row))
    for q, rows in enumerate(out):
        if len(rows) > 1 or None in rows[0]:
            # only alternatives that fill every missing component make a key
            out[q] = [row for row in dict.fromkeys(rows) if None not in row]
    return cast(list[list[KeyRow]], out)


def query_match_keys_bulk(
    records: Sequence[PersonRecord],
    rule_ids: Sequence[str],
    *,
    today: date,
) -> dict[str, list[list[bytes]]]:
    """Every key a requester evaluates, per rule and record (see :meth:`MatchRule.match_keys`).

    Rules without variants take the bulk path; rules with variants are built field by field
    (:func:`key_rows_bulk`, each variant expanded once per record) and joined.  The lists
    are parallel to ``records``.
    """
    rules = [get_rule(r) for r in dict.fromkeys(rule_ids)]
    plain = [rule.rule_id for rule in rules if not rule.variants]
    canonical = match_keys_bulk(records, plain, today=today) if plain else {}
    varied = [rule.rule_id for rule in rules if rule.variants]
    rows = key_rows_bulk(records, varied, today=today) if varied else {}
    join = b"".join
    out: dict[str, list[list[bytes]]] = {}
    for rule in rules:
        if not rule.variants:
            out[rule.rule_id] = [[] if k is None else [k] for k in canonical[rule.rule_id]]
        else:
            prefix = rule._prefix
            out[rule.rule_id] = [[prefix + join(row) for row in record_rows]
                                 for record_rows in rows.pop(rule.rule_id)]
    return out


def evaluation_count(records: Sequence[PersonRecord], rule_ids: Sequence[str], *,
                     today: date) -> int:
    """Keys a requester evaluates for ``records`` under ``rule_ids``: the exact budget
    (in OPRF elements) that variant keys need."""
    keys = query_match_keys_bulk(records, rule_ids, today=today)
    return sum(len(k) for column in keys.values() for k in column)


MATCH_RULES: dict[str, MatchRule] = {
    r.rule_id: r
    for r in (
        MatchRule("tin+dob", ("tin", "dob"), Strength.STRONG, "TIN and date of birth"),
        MatchRule(
            "tin+last_name",
            ("tin", "last_name"),
            Strength.STRONG,
            "TIN and last name (with generational suffix)",
        ),
        MatchRule(
            "first+last+dob+zip",
            ("first_name", "last_name", "dob", "zip"),
            Strength.MEDIUM,
            "first name, last name, date of birth and 5-digit ZIP",
        ),
        MatchRule(
            "first+last+address",
            ("first_name", "last_name", "address"),
            Strength.WEAK,
            "first name, last name and street address with 5-digit ZIP; "
            "high misidentification risk",
        ),
        # Typo-tolerant rules; strengths as measured (docs/architecture.md, Recall and
        # misidentification): STRONG anchors on the TIN and misidentified nobody, MEDIUM
        # kept precision >= 0.999, WEAK did not (default policies refuse WEAK rules).
        MatchRule(
            "tin+dob+variants",
            ("tin", "dob"),
            Strength.STRONG,
            "TIN and date of birth, also with one adjacent TIN transposition or day and "
            "month swapped (query-side variants, one budget unit each)",
            frozenset({Variant.TIN_TRANSPOSITION, Variant.DOB_SWAP}),
        ),
        MatchRule(
            "tin+last_phonetic",
            ("tin", "last_phonetic"),
            Strength.STRONG,
            "TIN and phonetic (NYSIIS) surname, compound surnames joined; also each part of "
            "a compound surname (query-side variants)",
            frozenset({Variant.SURNAME_PART}),
        ),
        MatchRule(
            "tin+first_phonetic",
            ("tin", "first_phonetic"),
            Strength.STRONG,
            "TIN and phonetic (NYSIIS) first name with nicknames folded to the formal name",
            frozenset({Variant.NICKNAME}),
        ),
        MatchRule(
            "tin+zip",
            ("tin", "zip"),
            Strength.STRONG,
            "TIN and 5-digit ZIP (for subjects whose names and date of birth carry errors)",
        ),
        MatchRule(
            "tin+last_phonetic+zip",
            ("tin", "last_phonetic", "zip"),
            Strength.STRONG,
            "TIN, phonetic surname and 5-digit ZIP; also one adjacent TIN transposition and "
            "compound-surname parts (query-side variants)",
            frozenset({Variant.TIN_TRANSPOSITION, Variant.SURNAME_PART}),
        ),
        MatchRule(
            "last_phonetic+dob+zip",
            ("last_phonetic", "dob", "zip"),
            Strength.WEAK,
            "phonetic surname, date of birth and 5-digit ZIP; also day/month swapped and "
            "compound-surname parts (query-side variants)",
            frozenset({Variant.DOB_SWAP, Variant.SURNAME_PART}),
        ),
        MatchRule(
            "first_phonetic+dob+zip",
            ("first_phonetic", "dob", "zip"),
            Strength.WEAK,
            "phonetic first name, date of birth and 5-digit ZIP; also day/month swapped and "
            "a nickname's formal names (query-side variants)",
            frozenset({Variant.DOB_SWAP, Variant.NICKNAME}),
        ),
        MatchRule(
            "names_phonetic+dob+zip",
            ("first_phonetic", "last_phonetic", "dob", "zip"),
            Strength.MEDIUM,
            "phonetic first and last name, date of birth and 5-digit ZIP; also day/month "
            "swapped, the day or decade off by one, two ZIP digits transposed, names "
            "exchanged, a nickname's formal names and compound-surname parts (query-side "
            "variants)",
            frozenset({Variant.DOB_SWAP, Variant.DOB_TYPO, Variant.ZIP_TRANSPOSITION,
                       Variant.NAME_ORDER, Variant.NICKNAME, Variant.SURNAME_PART}),
        ),
        MatchRule(
            "names_phonetic+dob",
            ("first_phonetic", "last_phonetic", "dob"),
            Strength.WEAK,
            "phonetic first and last name and date of birth; also day/month swapped, names "
            "exchanged, a nickname's formal names and compound-surname parts (query-side "
            "variants)",
            frozenset({Variant.DOB_SWAP, Variant.NAME_ORDER, Variant.NICKNAME,
                       Variant.SURNAME_PART}),
        ),
    )
}


#: The rule set ``psi-authority issue`` uses when ``--rules`` is not given: TIN rules that
#: tolerate one ordinary error each (and the TIN with the ZIP, for subjects whose names and
#: date of birth both carry errors), plus phonetic names with date of birth and ZIP for
#: subjects whose TIN is missing.  Chosen by measurement: precision >= 0.999 and recall
#: >= 0.95 on FEBRL 1-3 and the realistic synthetic scenario (docs/architecture.md, Recall
#: and misidentification).
DEFAULT_RULES: tuple[str, ...] = (
    "tin+dob+variants",
    "tin+last_phonetic",
    "tin+first_phonetic",
    "tin+zip",
    "tin+last_phonetic+zip",
    "names_phonetic+dob+zip",
)


def get_rule(rule_id: str) -> MatchRule:
    """The built-in rule with this id; ValueError (not KeyError) for an unknown id."""
    rule = MATCH_RULES.get(rule_id)
    if rule is None:
        raise ValueError(f"unknown match rule: {rule_id!r}")
    return rule


# --------------------------------------------------------------------------- corroboration
#
# A corroborated disclosure needs agreement on ``k`` independent rules (docs/architecture.md,
# Recall and misidentification: Corroboration).  Two rules are *independent* when each reads
# a source column the other does not: a rule whose columns are a subset of another's (the
# same rule with variants, ``tin+last_phonetic`` inside ``tin+last_phonetic+zip``, an exact
# and a phonetic spelling of the same name) is implied by it, so its agreement adds no
# evidence about the pair.

#: The most rules one corroborated group may carry (every built-in rule at once).
MAX_CORROBORATION = len(MATCH_RULES)


def rules_independent(rule_a: str, rule_b: str) -> bool:
    """Whether ``rule_a`` and ``rule_b`` are independent evidence: each compares a source
    column the other does not (so neither is implied by the other)."""
    a, b = set(rule_columns(rule_a)), set(rule_columns(rule_b))
    return not a <= b and not b <= a


def independent_group(rule_ids: Sequence[str]) -> bool:
    """Whether the rules are distinct and pairwise independent."""
    rules = list(rule_ids)
    return len(set(rules)) == len(rules) and all(
        rules_independent(a, b) for i, a in enumerate(rules) for b in rules[i + 1:])


def corroborating_group(rule_ids: Sequence[str], k: int) -> tuple[str, ...] | None:
    """The first ``k`` pairwise independent rules among ``rule_ids`` (in their order, repeats
    ignored), or None when no ``k`` of them are independent.  Both the requester (which
    rules it presents) and the plaintext corroborated join use it, so they agree."""
    distinct = list(dict.fromkeys(rule_ids))
    if k < 1 or len(distinct) < k:
        return None
    for combo in combinations(distinct, k):
        if independent_group(combo):
            return combo
    return None


def corroborated_pairs(pairs: Mapping[str, Mapping[str, Collection[int]]], k: int
                       ) -> dict[str, set[int]]:
    """The plaintext corroborated join: per query, the records on which at least ``k``
    pairwise independent rules agree, from ``pairs`` (rule -> query -> matched records)."""
    votes: dict[str, dict[int, list[str]]] = {}
    for rule_id, found in pairs.items():
        for query_id, hits in found.items():
            per_query = votes.setdefault(query_id, {})
            for h in hits:
                per_query.setdefault(h, []).append(rule_id)
    agreed: dict[str, set[int]] = {}
    for query_id, per_record in votes.items():
        hits = {h for h, rules in per_record.items()
                if corroborating_group(rules, k) is not None}
        if hits:
            agreed[query_id] = hits
    return agreed


def match_keys_bulk(
    records: Sequence[PersonRecord],
    rule_ids: Sequence[str],
    *,
    today: date,
) -> dict[str, list[bytes | None]]:
    """Match keys of every record under every rule, normalizing each field once per record.

    Result lists are parallel to ``records``; an entry is None where that rule has a missing
    or invalid component. This is the fast path for million-row index builds.
    """
    return match_keys_from_columns(
        lambda name: [getattr(r, name) for r in records], rule_ids, today=today)


def match_keys_from_columns(
    columns: ColumnSource,
    rule_ids: Sequence[str],
    *,
    today: date,
) -> dict[str, list[bytes | None]]:
    """``match_keys_bulk`` over raw field columns: storage that keeps records packed
    (``recordstore.CompactRecords``) feeds its columns here without building records."""
    rules = [get_rule(r) for r in dict.fromkeys(rule_ids)]
    built: dict[str, _Column] = {}
    for rule in rules:
        for f in rule.fields:
            if f not in built:
                built[f] = _FIELD_COLUMNS[f](columns, today)
    return {
        rule.rule_id: _combine(rule._prefix, [built[f] for f in rule.fields]) for rule in rules
    }


def _combine(prefix: bytes, cols: list[_Column]) -> _Column:
    """prefix || parts, row by row; None wherever any part is None."""
    if len(cols) == 2:
        a, b = cols
        return [
            prefix + x + y if x is not None and y is not None else None
            for x, y in zip(a, b, strict=True)
        ]
    if len(cols) == 3:
        a, b, c = cols
        return [
            prefix + x + y + z if x is not None and y is not None and z is not None else None
            for x, y, z in zip(a, b, c, strict=True)
        ]
    if len(cols) == 4:
        a, b, c, d = cols
        return [
            prefix + w + x + y + z
            if w is not None and x is not None and y is not None and z is not None
            else None
            for w, x, y, z in zip(a, b, c, d, strict=True)
        ]
    join = b"".join
    return [
        None if any(p is None for p in row) else prefix + join(row)
        for row in zip(*cols, strict=True)
    ]
