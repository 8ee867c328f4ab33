"""Seeded synthetic population (docs/architecture.md, Benchmark scenario).

Why synthetic: the accuracy of a match rule is only measurable against ground truth, and
real taxpayer or enforcement data can never sit in a repository.  Why this much realism:
weak rules look fine on clean data; they misidentify people on data that has households,
Jr/Sr pairs, common names, stale addresses and placeholder junk.  Each of those is
generated here on purpose, at a rate that :class:`ScenarioSpec` names.

The population is built in one vectorized pass:

* a geography of cities and ZIP codes, consistent per state (ZIP ranges and city name
  patterns from ``faker``'s en_US address provider, states weighted by 2020 census
  population);
* households of 1-6 people sharing an address and usually a surname, some with a father
  and a son of the same name (Jr/Sr), the suffix written down only sometimes;
* people whose first and last names follow real US frequencies (``faker``'s weighted en_US
  name tables), each holding a unique SSN- or ITIN-format TIN;
* a custodian file (the filers) and a request file holding exactly ``true_matches``
  filers, everyone else in it being a non-filer, often a relative living with a filer;
* noise on the request file: missing TINs, placeholder and ZIP-only addresses, name typos,
  moved addresses, street-suffix spellings, case and whitespace, date formats and typos.

Text is assembled as fixed-width byte matrices (one zero-padded ``uint8`` block per field
segment) and the padding is squeezed out when a file is written, so 2.6M rows never pass
through a per-row Python loop.  The CSV dialect is the one ``protocol.domain.records`` writes
(``csv`` minimal quoting, CRLF), so ``read_person_csv``/``read_query_csv`` read the files
and ``write_query_csv`` reproduces them byte for byte.

Ground truth goes to a separate file and is for measurement only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np

from protocol.adapters.files import open_csv, sha256_file
from protocol.domain.recordstore import CompactRecords, load_custodian_csv, load_query_csv

__all__ = [
    "CUSTODIAN_HEADER",
    "PLACEHOLDER_ADDRESSES",
    "QUERY_HEADER",
    "TRUTH_HEADER",
    "Progress",
    "ScenarioFiles",
    "ScenarioSpec",
    "ensure_scenario",
    "generate",
    "main",
]

GENERATOR_VERSION = 1

CUSTODIAN_HEADER: tuple[str, ...] = (
    "record_id", "tin", "first_name", "last_name", "dob", "address", "city", "state", "zip",
    "record_class", "tax_paid_cents",
)
QUERY_HEADER: tuple[str, ...] = (
    "record_id", "tin", "first_name", "last_name", "dob", "address", "city", "state", "zip",
    "tax_periods", "statute", "reason",
)
TRUTH_HEADER: tuple[str, ...] = ("query_record_id", "custodian_record_id")

#: The junk that stood in for an address in the 2025 request file.
PLACEHOLDER_ADDRESSES: tuple[str, ...] = ("Failed to Provide", "Unknown Address", "NA NA", "N/A")

#: Fixed reference date for ages, so the output never depends on the day it is generated.
REFERENCE_DATE = np.datetime64("2025-06-01", "D")

# 2020 census resident population in thousands (50 states + DC): where people live.
_STATE_POPULATION: dict[str, int] = {
    "AL": 5024, "AK": 733, "AZ": 7152, "AR": 3012, "CA": 39538, "CO": 5774, "CT": 3606,
    "DE": 990, "DC": 690, "FL": 21538, "GA": 10712, "HI": 1455, "ID": 1839, "IL": 12813,
    "IN": 6786, "IA": 3190, "KS": 2938, "KY": 4506, "LA": 4658, "ME": 1362, "MD": 6177,
    "MA": 7030, "MI": 10077, "MN": 5706, "MS": 2961, "MO": 6155, "MT": 1084, "NE": 1962,
    "NV": 3105, "NH": 1378, "NJ": 9289, "NM": 2118, "NY": 20201, "NC": 10439, "ND": 779,
    "OH": 11799, "OK": 3959, "OR": 4237, "PA": 13003, "RI": 1097, "SC": 5119, "SD": 887,
    "TN": 6911, "TX": 29146, "UT": 3272, "VT": 643, "VA": 8631, "WA": 7705, "WV": 1794,
    "WI": 5894, "WY": 577,
}

# Street suffix: (USPS abbreviation, full word, relative frequency).  Only common suffixes,
# because the noise we inject ("Street" vs "St") must be noise a normalizer can undo.
_STREET_SUFFIXES: tuple[tuple[str, str, float], ...] = (
    ("St", "Street", 0.30), ("Ave", "Avenue", 0.17), ("Rd", "Road", 0.13),
    ("Dr", "Drive", 0.13), ("Ln", "Lane", 0.07), ("Ct", "Court", 0.05),
    ("Blvd", "Boulevard", 0.03), ("Pl", "Place", 0.03), ("Cir", "Circle", 0.03),
    ("Ter", "Terrace", 0.02), ("Pkwy", "Parkway", 0.02), ("Trl", "Trail", 0.01),
    ("Hwy", "Highway", 0.01),
)

# Street names that are not people's names; the rest are built from faker's name tables,
# as faker's own en_US ``street_name_formats`` do.
_COMMON_STREETS: tuple[str, ...] = (
    "Main", "Oak", "Pine", "Maple", "Cedar", "Elm", "Park", "Lake", "Hill", "Washington",
    "Lincoln", "Jefferson", "Church", "Spring", "Ridge", "Sunset", "Highland", "Forest",
    "River", "Mill", "Center", "Walnut", "Chestnut", "Willow", "Meadow", "1st", "2nd", "3rd",
    "4th", "5th", "6th", "7th", "8th", "9th", "10th", "11th", "12th",
)

# Household sizes 1..6 (roughly the US shares).
_HOUSEHOLD_SIZES = np.array([0.28, 0.35, 0.15, 0.13, 0.06, 0.03])

_TAX_PERIODS = (("2023;2024", 0.55), ("2022;2023", 0.2), ("2024", 0.2),
                ("2021;2022;2023;2024", 0.05))
_STATUTES = (("26 U.S.C. 6103(i)(2)", 0.9), ("26 U.S.C. 6103(i)(1)", 0.1))
_REASONS = (
    ("Locate subject of a pending nontax criminal investigation", 0.4),
    ("Locate subject of a final order of removal", 0.4),
    ("Locate witness in a pending federal proceeding", 0.1),
    ("Verify last known address for service of process", 0.1),
)

_JR_SPELLINGS = (" Jr", " Jr.", " JR", ", Jr.")
_SR_SPELLINGS = (" Sr", " Sr.", " SR")
_UNIT_WORDS = ((" Apt ", 0.6), (" Apt. ", 0.3), (" APT ", 0.1))

# TIN spaces, linearised.  SSN: area 001-899 except 666, group 01-99, serial 0001-9999.
# ITIN: area 900-999, group 70-88, serial 0001-9999.
_SSN_AREAS = 898
_ITIN_GROUPS = 19
_SERIALS = 9999

_U8 = np.uint8
_COMMA, _QUOTE, _CR, _LF = 44, 34, 13, 10


@dataclass(frozen=True)
class ScenarioSpec:
    """Every knob of the synthetic population; rates are per query unless said otherwise.

    The defaults are the headline scenario.  :meth:`scaled` keeps every rate and scales the
    number of true matches with the request file, so a small run has the same shape.
    """

    queries: int = 1_280_000
    records: int = 1_300_000
    true_matches: int = 47_289
    seed: int = 20251
    placeholder_rate: float = 0.03
    zip_only_rate: float = 0.01
    missing_tin_rate: float = 0.05
    name_typo_rate: float = 0.03
    moved_rate: float = 0.15
    #: Queries that spell the street suffix differently from the custodian ("St"/"Street").
    abbreviation_rate: float = 0.35
    case_noise_rate: float = 0.30
    whitespace_noise_rate: float = 0.02
    dob_format_rate: float = 0.08
    dob_typo_rate: float = 0.005
    tin_typo_rate: float = 0.002
    missing_request_field_rate: float = 0.002
    custodian_dob_format_rate: float = 0.01
    #: Share of all people (not just queries) holding an ITIN rather than an SSN.
    itin_rate: float = 0.04
    #: Share of custodian records in the "protected" record class.
    protected_rate: float = 0.001
    #: Share of households with a male head and >= 2 members that hold a Jr/Sr pair.
    jr_sr_rate: float = 0.03
    #: Chance that a Jr/Sr suffix is written down in a given file.
    suffix_recorded_rate: float = 0.35
    #: People per ZIP code; sets how often common names collide within a ZIP.
    persons_per_zip: int = 6_000
    # The realistic error model's extra corruptions (0 in the baseline, see
    # :meth:`realistic`): a nickname for the first name, first and last name exchanged,
    # a missing date of birth, and compound (hyphenated) surnames that one file writes whole
    # and the other only in part.
    nickname_rate: float = 0.0
    name_order_rate: float = 0.0
    missing_dob_rate: float = 0.0
    #: Share of all people holding a two-part surname ("Garcia-Lopez").
    compound_surname_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.queries < 1 or self.records < 1:
            raise ValueError("queries and records must be positive")
        if not 0 <= self.true_matches <= min(self.queries, self.records):
            raise ValueError("true_matches must lie in [0, min(queries, records)]")
        if self.persons_per_zip < 1:
            raise ValueError("persons_per_zip must be positive")
        for f in dataclasses.fields(self):
            if f.name.endswith("_rate"):
                value = getattr(self, f.name)
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"{f.name} must lie in [0, 1], got {value}")
        if self.placeholder_rate + self.zip_only_rate > 1.0:
            raise ValueError("placeholder_rate + zip_only_rate must not exceed 1")

    def realistic(self) -> ScenarioSpec:
        """The same population with the realistic error model on the request file.

        Error types and their shape follow the published corruption models of record
        linkage test data: Damerau (1964, CACM 7(3)) found about 80% of misspellings to
        be one insertion, deletion, substitution or transposition, which is why each
        corrupted name gets exactly one such edit; the Febrl data set generator and its
        successor GeCo (Christen and Pudjijono 2009, "Accurate synthetic generation of
        realistic personal information", PAKDD; Christen and Vatsalan 2013, CIKM) corrupt
        a record field by field with typographical edits, nickname/value replacements,
        swapped values, swapped date parts and missing values, at per-field rates of a
        few percent.  The rates below are this project's calibration inside that range
        (per query, not per field value), chosen so every error type occurs thousands of
        times at 100k queries; they are not copied from either tool's configuration.
        """
        return dataclasses.replace(
            self,
            name_typo_rate=0.08,  # one keyboard edit in the first or the last name
            dob_typo_rate=0.03,  # off by a day, wrong decade, or day/month swapped
            tin_typo_rate=0.02,  # two adjacent digits swapped (else one digit wrong)
            missing_tin_rate=0.05,
            nickname_rate=0.04,
            name_order_rate=0.01,
            missing_dob_rate=0.01,
            compound_surname_rate=0.02,
        )

    def scaled(self, queries: int, records: int) -> ScenarioSpec:
        """The same population shape at another size: every rate and the share of the
        request file that is a true match are kept (at least one match)."""
        share = self.true_matches / self.queries
        matches = min(max(1, round(share * queries)), queries, records)
        return dataclasses.replace(self, queries=queries, records=records, true_matches=matches)


@dataclass(frozen=True)
class ScenarioFiles:
    """Where one generated scenario lives."""

    custodian: Path
    queries: Path
    truth: Path
    manifest: Path

    @classmethod
    def in_dir(cls, out_dir: Path) -> ScenarioFiles:
        """The fixed file names inside a scenario directory."""
        out_dir = Path(out_dir)
        return cls(
            custodian=out_dir / "custodian.csv",
            queries=out_dir / "queries.csv",
            truth=out_dir / "truth.csv",
            manifest=out_dir / "manifest.json",
        )

    def load(self, *, today: date) -> tuple[CompactRecords, CompactRecords]:
        """(custodian records, accepted query subjects), validated as of ``today``; refused
        rows are dropped (the demo and the benchmarks measure, they report no refusals)."""
        with open_csv(self.custodian) as fh:
            records = load_custodian_csv(fh, today=today)[0]
        with open_csv(self.queries) as fh:
            queries = load_query_csv(fh, today=today)[0]
        return records, queries


class Progress:
    """Stage timings on stderr, so a full-scale run shows where its time goes."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, stage: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"[{elapsed:7.2f}s] {stage}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- byte segments
#
# A segment is a (rows, width) uint8 matrix holding one piece of text per row, padded with
# zero bytes.  Zero never occurs in text, so segments concatenate by placing them side by
# side and the padding is dropped in one pass at write time.


def _vocab(values: Sequence[str]) -> np.ndarray:
    """A small vocabulary as fixed-width bytes (built once, indexed per row)."""
    return np.array([v.encode("utf-8") for v in values], dtype=bytes)


def _take(vocab: np.ndarray, idx: np.ndarray) -> np.ndarray:
    picked: np.ndarray = vocab[idx]
    return picked.view(_U8).reshape(len(picked), vocab.dtype.itemsize)


def _lit(text: str, n: int, mask: np.ndarray | None = None) -> np.ndarray:
    """The same text on every row (or only where ``mask``)."""
    row = np.frombuffer(text.encode("utf-8"), dtype=_U8)
    block = np.broadcast_to(row, (n, row.size))
    return block if mask is None else block * mask[:, None].astype(_U8)


def _digits(values: np.ndarray, width: int, *, zero_pad: bool = True) -> np.ndarray:
    """Decimal digits of non-negative integers, zero-padded to ``width`` or left-trimmed."""
    v = np.asarray(values, dtype=np.int64)
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    out = ((v[:, None] // powers) % 10 + 48).astype(_U8)
    if not zero_pad:
        lead = v[:, None] < powers
        lead[:, -1] = False
        out[lead] = 0
    return out


def _cat(*segments: np.ndarray) -> np.ndarray:
    return np.concatenate(segments, axis=1)


def _pad(segment: np.ndarray, width: int) -> np.ndarray:
    extra = width - segment.shape[1]
    if extra <= 0:
        return segment
    return _cat(segment, np.zeros((segment.shape[0], extra), dtype=_U8))


def _select(conds: Sequence[np.ndarray], choices: Sequence[np.ndarray],
            default: np.ndarray) -> np.ndarray:
    """Row-wise choice between segments of different widths; the first true condition wins."""
    width = max(s.shape[1] for s in (*choices, default))
    out = np.array(_pad(default, width))
    for cond, choice in reversed(list(zip(conds, choices, strict=True))):
        out[cond] = _pad(choice, width)[cond]
    return out


def _blank(segment: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return segment * (~mask)[:, None].astype(_U8)


def _recase(segment: np.ndarray, upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
    """ASCII upper-case the rows in ``upper`` and lower-case those in ``lower``."""
    out = np.array(segment)
    is_lower = (segment >= 97) & (segment <= 122)
    is_upper = (segment >= 65) & (segment <= 90)
    out[is_lower & upper[:, None]] -= 32
    out[is_upper & lower[:, None]] += 32
    return out


def _weighted_pick(rng: np.random.Generator, table: Sequence[tuple[str, float]],
                   n: int) -> np.ndarray:
    p = np.array([w for _, w in table])
    return _take(_vocab([t for t, _ in table]), rng.choice(len(table), size=n, p=p / p.sum()))


# --------------------------------------------------------------------------- faker tables


@dataclass(frozen=True)
class _Names:
    first: np.ndarray  # female names, then male names (bytes vocabulary)
    female_p: np.ndarray  # probabilities over the whole ``first`` vocabulary
    male_p: np.ndarray
    last: np.ndarray
    last_p: np.ndarray
    first_text: tuple[str, ...]
    last_text: tuple[str, ...]


def _names() -> _Names:
    """US first (by sex) and last name frequencies, as maintained in faker's en_US tables."""
    from faker.providers.person.en_US import Provider

    female = dict(Provider.first_names_female)
    male = dict(Provider.first_names_male)
    last = dict(Provider.last_names)
    first_text = (*female, *male)
    if not all(n.isascii() for n in (*first_text, *last)):
        raise ValueError("name tables must be ASCII (typos are made byte-wise)")
    f_w = np.array([*female.values(), *np.zeros(len(male))])
    m_w = np.array([*np.zeros(len(female)), *male.values()])
    l_w = np.array(list(last.values()))
    return _Names(
        first=_vocab(first_text), female_p=f_w / f_w.sum(), male_p=m_w / m_w.sum(),
        last=_vocab(tuple(last)), last_p=l_w / l_w.sum(),
        first_text=first_text, last_text=tuple(last),
    )


def _faker_version() -> str:
    import faker

    return str(faker.VERSION)


# --------------------------------------------------------------------------- population


@dataclass
class _Geography:
    zip_num: np.ndarray  # per ZIP: the 5-digit code as an integer
    city: np.ndarray  # per ZIP: index into ``city_vocab``
    state: np.ndarray  # per ZIP: index into ``state_vocab``
    city_vocab: np.ndarray
    state_vocab: np.ndarray


def _geography(rng: np.random.Generator, n_zips: int, names: _Names) -> _Geography:
    """Cities with ZIP codes inside their state's real ZIP range."""
    from faker.providers.address.en_US import Provider

    ranges: dict[str, tuple[int, int]] = dict(Provider.states_postcode)
    prefixes, suffixes = tuple(Provider.city_prefixes), tuple(Provider.city_suffixes)
    states = tuple(_STATE_POPULATION)
    weights = np.array(list(_STATE_POPULATION.values()), dtype=np.float64)
    n_cities = max(1, math.ceil(n_zips / 2.5))
    city_state = rng.choice(len(states), size=n_cities, p=weights / weights.sum())

    # City names follow faker's en_US city_formats; a loop over cities, not over rows.
    first = rng.choice(len(names.first_text), size=n_cities, p=(names.female_p + names.male_p) / 2)
    last = rng.choice(len(names.last_text), size=n_cities, p=names.last_p)
    prefix = rng.integers(0, len(prefixes), n_cities)
    suffix = rng.integers(0, len(suffixes), n_cities)
    fmt = rng.integers(0, 4, n_cities)
    patterns = ("{p} {f}{s}", "{p} {f}", "{f}{s}", "{last}{s}")
    city_names = [
        patterns[k].format(p=prefixes[a], f=names.first_text[b], s=suffixes[c],
                           last=names.last_text[d])
        for k, a, b, c, d in zip(fmt.tolist(), prefix.tolist(), first.tolist(),
                                 suffix.tolist(), last.tolist(), strict=True)
    ]

    zip_city = np.concatenate([
        np.arange(min(n_cities, n_zips)),
        rng.integers(0, n_cities, size=max(0, n_zips - n_cities)),
    ])
    zip_state = city_state[zip_city]
    zip_num = np.empty(n_zips, dtype=np.int64)
    for s in np.unique(zip_state).tolist():  # one pass per state, not per row
        members = np.flatnonzero(zip_state == s)
        lo, hi = ranges[states[s]]
        size = hi - lo + 1
        zip_num[members] = lo + rng.choice(size, size=members.size, replace=members.size > size)
    return _Geography(zip_num=zip_num, city=zip_city, state=zip_state,
                      city_vocab=_vocab(city_names), state_vocab=_vocab(states))


def _unique_draws(rng: np.random.Generator, space: int, n: int) -> np.ndarray:
    """``n`` distinct integers from ``[0, space)`` in random order: oversample, drop
    repeats keeping first occurrences, top up if short."""
    if n > space:
        raise ValueError("TIN space exhausted")
    taken = np.empty(0, dtype=np.int64)
    while taken.size < n:
        need = n - taken.size
        draws = rng.integers(0, space, size=need + need // 50 + 64, dtype=np.int64)
        merged = np.concatenate([taken, draws])
        _, first = np.unique(merged, return_index=True)
        taken = merged[np.sort(first)]
    return taken[:n]


def _tins(rng: np.random.Generator, n: int, itin_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Distinct TINs as a (n, 9) digit segment, and the ITIN mask."""
    is_itin = rng.random(n) < itin_rate
    area = np.empty(n, dtype=np.int64)
    group = np.empty(n, dtype=np.int64)
    serial = np.empty(n, dtype=np.int64)

    ssn = _unique_draws(rng, _SSN_AREAS * 99 * _SERIALS, int((~is_itin).sum()))
    a, rest = np.divmod(ssn, 99 * _SERIALS)
    g, s = np.divmod(rest, _SERIALS)
    a = a + 1
    a = a + (a >= 666)  # area 666 is never issued
    area[~is_itin], group[~is_itin], serial[~is_itin] = a, g + 1, s + 1

    itin = _unique_draws(rng, 100 * _ITIN_GROUPS * _SERIALS, int(is_itin.sum()))
    a, rest = np.divmod(itin, _ITIN_GROUPS * _SERIALS)
    g, s = np.divmod(rest, _SERIALS)
    area[is_itin], group[is_itin], serial[is_itin] = a + 900, g + 70, s + 1

    return _cat(_digits(area, 3), _digits(group, 2), _digits(serial, 4)), is_itin


@dataclass
class _Population:
    """Everyone who exists, filers or not; arrays by person, then by household."""

    hh: np.ndarray
    first: np.ndarray  # index into names.first
    last: np.ndarray  # index into names.last
    last2: np.ndarray  # second part of a compound surname (index into names.last), or -1
    dob: np.ndarray  # datetime64[D]
    tin: np.ndarray  # (people, 9) digits
    is_itin: np.ndarray
    suffix: np.ndarray  # 0 none, 1 Jr, 2 Sr
    n_households: int
    house_no: np.ndarray
    street: np.ndarray  # index into street_vocab
    street_suffix: np.ndarray  # index into _STREET_SUFFIXES
    suffix_style: np.ndarray  # 0 abbreviation, 1 full word: the custodian's spelling
    unit_no: np.ndarray  # 0 = no unit
    unit_letter: np.ndarray  # index into "", A, B, C
    zip_idx: np.ndarray
    street_vocab: np.ndarray
    names: _Names
    geo: _Geography
    jr_sr_pairs: int


def _ages_to_dob(rng: np.random.Generator, age_years: np.ndarray) -> np.ndarray:
    days = np.floor(age_years * 365.25).astype(np.int64) + rng.integers(0, 365, age_years.size)
    return REFERENCE_DATE - days.astype("timedelta64[D]")


def _population(rng: np.random.Generator, spec: ScenarioSpec, size: int) -> _Population:
    names = _names()
    n_zips = max(3, math.ceil(size / spec.persons_per_zip))
    geo = _geography(rng, n_zips, names)

    # Households: draw sizes until they cover everyone, then trim the last one.
    options = np.arange(1, 7)
    mean = float((_HOUSEHOLD_SIZES * options).sum())
    guess = int(size / mean * 1.1) + 16
    sizes = rng.choice(options, size=guess, p=_HOUSEHOLD_SIZES)
    while sizes.sum() < size:
        sizes = np.concatenate([sizes, rng.choice(options, size=guess, p=_HOUSEHOLD_SIZES)])
    ends = np.cumsum(sizes)
    n_h = int(np.searchsorted(ends, size) + 1)
    sizes = sizes[:n_h].copy()
    sizes[-1] -= int(ends[n_h - 1] - size)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    hh = np.repeat(np.arange(n_h), sizes)
    role = np.arange(size) - starts[hh]

    # Household address.  Street names: surnames, men's first names, or common names.
    n_last, n_first = len(names.last_text), len(names.first_text)
    street_vocab = _vocab((*names.last_text, *names.first_text, *_COMMON_STREETS))
    kind = rng.random(n_h)
    street = np.where(
        kind < 0.45,
        rng.choice(n_last, size=n_h, p=names.last_p),
        np.where(
            kind < 0.70,
            n_last + rng.choice(n_first, size=n_h, p=names.male_p),
            n_last + n_first + rng.integers(0, len(_COMMON_STREETS), n_h),
        ),
    )
    suffix_p = np.array([w for _, _, w in _STREET_SUFFIXES])
    street_suffix = rng.choice(len(_STREET_SUFFIXES), size=n_h, p=suffix_p / suffix_p.sum())
    suffix_style = (rng.random(n_h) < 0.15).astype(np.int64)
    house_no = np.exp(rng.uniform(np.log(10), np.log(20000), n_h)).astype(np.int64)
    unit_no = np.where(rng.random(n_h) < 0.12, rng.integers(1, 40, n_h), 0)
    unit_letter = rng.integers(0, 4, n_h)
    zip_idx = rng.integers(0, n_zips, n_h)

    # Head, then partner, then children or other adult relatives.
    head_male = rng.random(n_h) < 0.55
    head_age = 22 + rng.beta(2.0, 2.6, n_h) * 66
    partner_opposite = rng.random(size) < 0.9
    male = np.where(
        role == 0,
        head_male[hh],
        np.where(role == 1, head_male[hh] ^ partner_opposite, rng.random(size) < 0.5),
    )
    age = np.where(
        role == 0,
        head_age[hh],
        np.where(
            role == 1,
            head_age[hh] + rng.normal(-1.5, 5.0, size),
            head_age[hh] - rng.uniform(18, 38, size),
        ),
    )
    age = np.where(age < 16, rng.uniform(18, 70, size), age)  # an adult relative instead

    surname = rng.choice(n_last, size=n_h, p=names.last_p)
    own_surname = (role > 0) & (rng.random(size) < np.where(role == 1, 0.3, 0.1))
    last = np.where(own_surname, rng.choice(n_last, size=size, p=names.last_p), surname[hh])
    first = np.where(
        male,
        rng.choice(n_first, size=size, p=names.male_p),
        rng.choice(n_first, size=size, p=names.female_p),
    )
    # Families rarely give two members the same name by accident; namesakes come only
    # from the explicit Jr/Sr pairs below, so their rate is a knob and not an artifact.
    for _ in range(8):
        ident = (hh.astype(np.int64) * n_last + last) * n_first + first
        _, keep = np.unique(ident, return_index=True)
        clash = np.ones(size, dtype=bool)
        clash[keep] = False
        if not clash.any():
            break
        redraw = np.flatnonzero(clash)
        first[redraw] = np.where(
            male[redraw],
            rng.choice(n_first, size=redraw.size, p=names.male_p),
            rng.choice(n_first, size=redraw.size, p=names.female_p),
        )

    # Jr/Sr: a father heading the household and a son of the same name living with him.
    jr_h = np.flatnonzero(head_male & (sizes >= 2) & (rng.random(n_h) < spec.jr_sr_rate))
    father = starts[jr_h]
    son = starts[jr_h] + sizes[jr_h] - 1
    father_age = rng.uniform(48, 88, jr_h.size)  # so the son is at least 16
    age[father] = father_age
    age[son] = father_age - rng.uniform(20, 32, jr_h.size)
    first[son] = first[father]
    last[son] = last[father]
    suffix = np.zeros(size, dtype=np.int8)
    suffix[son] = 1
    suffix[father] = 2

    dob = _ages_to_dob(rng, age)
    tin, is_itin = _tins(rng, size, spec.itin_rate)
    last2 = np.full(size, -1, dtype=np.int64)
    if spec.compound_surname_rate > 0:  # own stream: the baseline's draws stay unchanged
        extra = np.random.default_rng(np.random.SeedSequence(spec.seed).spawn(5)[4])
        holders = np.flatnonzero(extra.random(size) < spec.compound_surname_rate)
        last2[holders] = extra.choice(n_last, size=holders.size, p=names.last_p)
    return _Population(
        last2=last2,
        hh=hh, first=first, last=last, dob=dob, tin=tin, is_itin=is_itin, suffix=suffix,
        n_households=n_h, house_no=house_no, street=street, street_suffix=street_suffix,
        suffix_style=suffix_style, unit_no=unit_no, unit_letter=unit_letter, zip_idx=zip_idx,
        street_vocab=street_vocab, names=names, geo=geo, jr_sr_pairs=int(jr_h.size),
    )


# --------------------------------------------------------------------------- noise


def _typos(rng: np.random.Generator, names: np.ndarray) -> np.ndarray:
    """One keyboard-style edit per row of a name segment (substitute, delete, transpose or
    double a letter), never on the first letter, which people rarely get wrong.

    The segment needs two spare zero columns on the right; the width is kept.
    """
    n: int = names.shape[0]  # an int, not Any: it picks the array overload of integers()
    if n == 0:
        return names
    mat = names
    width = mat.shape[1]
    lengths = (mat != 0).sum(axis=1)
    rows = np.arange(n)
    kind = rng.integers(0, 4, size=n)
    kind = np.where(lengths < 3, 0, kind)
    kind = np.where((kind == 2) & (lengths < 4), 0, kind)
    pos = 1 + (rng.random(n) * np.maximum(lengths - 1, 1)).astype(np.int64)
    pos = np.minimum(pos, np.maximum(lengths - 1, 1))
    tpos = np.minimum(pos, np.maximum(lengths - 2, 1))
    same = mat[rows, tpos] == mat[rows, tpos + 1]
    kind = np.where((kind == 2) & same, 0, kind)  # swapping equal letters changes nothing

    out = mat.copy()
    cols = np.arange(width)[None, :]

    sub = kind == 0
    letter = (ord("a") + rng.integers(0, 26, size=n)).astype(_U8)
    clash = letter == mat[rows, pos]
    letter = np.where(clash, ord("a") + (letter - ord("a") + 1) % 26, letter).astype(_U8)
    out[rows[sub], pos[sub]] = letter[sub]

    dele = kind == 1
    shifted = np.take_along_axis(mat, np.minimum(cols + (cols >= pos[:, None]), width - 1), 1)
    out[dele] = shifted[dele]

    tr = rows[kind == 2]
    out[tr, tpos[tr]] = mat[tr, tpos[tr] + 1]
    out[tr, tpos[tr] + 1] = mat[tr, tpos[tr]]

    ins = kind == 3
    doubled = np.take_along_axis(mat, np.maximum(cols - (cols > pos[:, None]), 0), 1)
    out[ins] = doubled[ins]
    return out


def _digit_typos(rng: np.random.Generator, digits: np.ndarray) -> np.ndarray:
    """Swap two adjacent, different digits, or else bump one digit."""
    out = np.array(digits)
    n = out.shape[0]
    rows = np.arange(n)
    pos = rng.integers(0, out.shape[1] - 1, size=n)
    a, b = out[rows, pos].copy(), out[rows, pos + 1].copy()
    swap = a != b
    out[rows[swap], pos[swap]] = b[swap]
    out[rows[swap], pos[swap] + 1] = a[swap]
    bump = rows[~swap]
    out[bump, pos[bump]] = (48 + (a[~swap] - 48 + 1) % 10).astype(_U8)
    return out


def _dob_typos(rng: np.random.Generator, dob: np.ndarray) -> np.ndarray:
    """A day off by one, a decade digit wrong, or day and month swapped where valid."""
    years = dob.astype("datetime64[Y]")
    months = dob.astype("datetime64[M]")
    month_idx = (months - years.astype("datetime64[M]")).astype(np.int64)
    day_idx = (dob - months.astype("datetime64[D]")).astype(np.int64)
    kind = rng.integers(0, 3, size=dob.size)
    kind = np.where((kind == 2) & ((day_idx > 11) | (day_idx == month_idx)), 0, kind)
    off_by_one = dob + np.where(rng.random(dob.size) < 0.5, -1, 1).astype("timedelta64[D]")
    decade = np.where(rng.random(dob.size) < 0.5, -10, 10).astype("timedelta64[Y]")
    wrong_year = (years + decade).astype("datetime64[M]") + month_idx.astype("timedelta64[M]")
    wrong_year = wrong_year.astype("datetime64[D]") + day_idx.astype("timedelta64[D]")
    swapped = years.astype("datetime64[M]") + day_idx.astype("timedelta64[M]")
    swapped = swapped.astype("datetime64[D]") + month_idx.astype("timedelta64[D]")
    return np.select([kind == 0, kind == 1], [off_by_one, wrong_year], swapped)


def _dob_text(dob: np.ndarray, us_format: np.ndarray) -> np.ndarray:
    """ISO ``YYYY-MM-DD``, or ``MM/DD/YYYY`` where ``us_format``."""
    years = dob.astype("datetime64[Y]")
    months = dob.astype("datetime64[M]")
    y = _digits(years.astype(np.int64) + 1970, 4)
    m = _digits((months - years.astype("datetime64[M]")).astype(np.int64) + 1, 2)
    d = _digits((dob - months.astype("datetime64[D]")).astype(np.int64) + 1, 2)
    n = dob.size
    iso = _cat(y, _lit("-", n), m, _lit("-", n), d)
    us = _cat(m, _lit("/", n), d, _lit("/", n), y)
    return np.where(us_format[:, None], us, iso)


def _dashed(tin: np.ndarray, dash: np.ndarray) -> np.ndarray:
    n = tin.shape[0]
    sep = _lit("-", n, dash)
    return _cat(tin[:, :3], sep, tin[:, 3:5], sep, tin[:, 5:])


def _last_with_suffix(rng: np.random.Generator, pop: _Population, people: np.ndarray,
                      last: np.ndarray, rate: float) -> np.ndarray:
    """Write the Jr/Sr suffix after the surname, but only sometimes, as real files do."""
    n = people.size
    kind = pop.suffix[people]
    recorded = (kind > 0) & (rng.random(n) < rate)
    jr = _take(_vocab(_JR_SPELLINGS), rng.integers(0, len(_JR_SPELLINGS), n))
    sr = _take(_vocab(_SR_SPELLINGS), rng.integers(0, len(_SR_SPELLINGS), n))
    tag = _select([kind == 1], [jr], sr)
    return _cat(last, _blank(tag, ~recorded))


def _surnames(rng: np.random.Generator, pop: _Population, people: np.ndarray,
              whole_rate: float, joiners: tuple[str, ...]) -> np.ndarray:
    """Surnames as one file writes them: a compound surname whole (``whole_rate``, joined by
    one of ``joiners``) or only its first part, as systems that keep one surname do."""
    last = _take(pop.names.last, pop.last[people])
    second = pop.last2[people]
    compound = second >= 0
    if not compound.any():  # the baseline draws nothing here, so its files stay identical
        return last
    n = people.size
    whole = compound & (rng.random(n) < whole_rate)
    joiner = _take(_vocab(joiners), rng.integers(0, len(joiners), n))
    tail = _take(pop.names.last, np.maximum(second, 0))
    return _cat(last, _blank(joiner, ~whole), _blank(tail, ~whole))


@lru_cache(maxsize=1)
def _nickname_table(first_text: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nickname vocabulary, first index of each name's nicknames, how many it has), from the
    ``nicknames`` package's maintained list (the same list the match keys fold)."""
    from nicknames import NickNamer

    namer = NickNamer()
    vocab: list[str] = []
    start = np.zeros(len(first_text), dtype=np.int64)
    count = np.zeros(len(first_text), dtype=np.int64)
    for i, name in enumerate(first_text):
        nicks = sorted(n.title() for n in namer.nicknames_of(name.lower())
                       if n.isascii() and n.isalpha() and len(n) < len(name))
        start[i], count[i] = len(vocab), len(nicks)
        vocab.extend(nicks)
    return _vocab(vocab or [""]), start, count


def _nicknames(rng: np.random.Generator, pop: _Population, people: np.ndarray,
               first: np.ndarray, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Replace some first names by one of their nicknames ("William" -> "Bill")."""
    vocab, start, count = _nickname_table(pop.names.first_text)
    idx = pop.first[people]
    chosen = (rng.random(people.size) < rate) & (count[idx] > 0)
    pick = start[idx] + (rng.random(people.size) * np.maximum(count[idx], 1)).astype(np.int64)
    nick = _take(vocab, np.where(chosen, pick, 0))
    return _select([chosen], [nick], first), chosen


def _street_line(pop: _Population, hh: np.ndarray, style: np.ndarray, unit_word: np.ndarray,
                 spaced: np.ndarray) -> np.ndarray:
    """``<no> <street> <suffix>[ Apt <unit>]``; style 0 "St", 1 "Street", 2 "St."."""
    n = hh.size
    spellings = [s for abbr, full, _ in _STREET_SUFFIXES for s in (abbr, full, abbr + ".")]
    suffix = _take(_vocab(spellings), pop.street_suffix[hh] * 3 + style)
    unit_no = pop.unit_no[hh]
    has_unit = unit_no > 0
    unit = _cat(
        _blank(unit_word, ~has_unit),
        _blank(_digits(unit_no, 2, zero_pad=False), ~has_unit),
        _blank(_take(_vocab(("", "A", "B", "C")), pop.unit_letter[hh]), ~has_unit),
    )
    return _cat(
        _digits(pop.house_no[hh], 5, zero_pad=False), _lit(" ", n), _lit(" ", n, spaced),
        _take(pop.street_vocab, pop.street[hh]), _lit(" ", n), suffix, unit,
    )


# --------------------------------------------------------------------------- the two files


def _custodian_fields(rng: np.random.Generator, spec: ScenarioSpec, pop: _Population,
                      people: np.ndarray) -> list[np.ndarray]:
    n = people.size
    hh = pop.hh[people]
    zip_idx = pop.zip_idx[hh]
    tax = np.exp(rng.normal(np.log(650_000), 1.1, n)).astype(np.int64)
    tax = np.where(rng.random(n) < 0.08, 0, np.minimum(tax, 5_000_000_000))
    protected = rng.random(n) < spec.protected_rate
    last = _last_with_suffix(rng, pop, people, _surnames(rng, pop, people, 0.5, ("-",)),
                             spec.suffix_recorded_rate)
    no = np.zeros(n, dtype=bool)
    return [
        _cat(_lit("C", n), _digits(np.arange(1, n + 1), 8)),
        pop.tin[people],
        _take(pop.names.first, pop.first[people]),
        last,
        _dob_text(pop.dob[people], rng.random(n) < spec.custodian_dob_format_rate),
        _street_line(pop, hh, pop.suffix_style[hh], _lit(" Apt ", n), no),
        _take(pop.geo.city_vocab, pop.geo.city[zip_idx]),
        _take(pop.geo.state_vocab, pop.geo.state[zip_idx]),
        _digits(pop.geo.zip_num[zip_idx], 5),
        _lit("protected", n, protected),
        _digits(tax, 11, zero_pad=False),
    ]


def _query_fields(rng: np.random.Generator, spec: ScenarioSpec, pop: _Population,
                  people: np.ndarray, counts: dict[str, int]) -> list[np.ndarray]:
    n = people.size
    geo = pop.geo

    # Names, with a typo in one of the two for some.
    first = _take(pop.names.first, pop.first[people])
    nicknamed = np.zeros(n, dtype=bool)
    if spec.nickname_rate > 0:
        first, nicknamed = _nicknames(rng, pop, people, first, spec.nickname_rate)
    first = _pad(first, first.shape[1] + 2)
    last = _surnames(rng, pop, people, 1.0, ("-", " "))
    last = _pad(last, last.shape[1] + 2)
    typo = rng.random(n) < spec.name_typo_rate
    in_first = rng.random(n) < 0.5
    rows = np.flatnonzero(typo & in_first)
    first[rows] = _typos(rng, first[rows])
    rows = np.flatnonzero(typo & ~in_first)
    last[rows] = _typos(rng, last[rows])
    swapped = np.zeros(n, dtype=bool)
    if spec.name_order_rate > 0:  # first and last name written in each other's column
        swapped = rng.random(n) < spec.name_order_rate
        width = max(first.shape[1], last.shape[1])
        first, last = _pad(first, width), _pad(last, width)
        first, last = np.where(swapped[:, None], last, first), np.where(swapped[:, None],
                                                                        first, last)
    last = _last_with_suffix(rng, pop, people, last, spec.suffix_recorded_rate)

    # Address: the household's, or a previous one (another household's) after a move.
    hh = pop.hh[people]
    moved = (rng.random(n) < spec.moved_rate) & (pop.n_households > 1)
    other = rng.integers(0, max(pop.n_households - 1, 1), n)
    other = np.where(other >= hh, other + 1, other) % pop.n_households
    addr_hh = np.where(moved, other, hh)
    style = pop.suffix_style[addr_hh]
    restyle = rng.random(n) < spec.abbreviation_rate
    style = np.where(restyle, (style + rng.integers(1, 3, n)) % 3, style)
    unit_word = _weighted_pick(rng, _UNIT_WORDS, n)
    spaced = rng.random(n) < spec.whitespace_noise_rate
    street = _street_line(pop, addr_hh, style, unit_word, spaced)
    zip_idx = pop.zip_idx[addr_hh]
    city = _take(geo.city_vocab, geo.city[zip_idx])
    state = _take(geo.state_vocab, geo.state[zip_idx])
    zip_code = _digits(geo.zip_num[zip_idx], 5)

    # Case noise on the free-text fields; a stray trailing space after some surnames.
    case = rng.random(n)
    upper = case < spec.case_noise_rate * 0.85
    lower = (case >= spec.case_noise_rate * 0.85) & (case < spec.case_noise_rate)
    first, last, street, city = (_recase(s, upper, lower) for s in (first, last, street, city))
    last = _cat(last, _lit(" ", n, rng.random(n) < spec.whitespace_noise_rate))

    # Placeholder and ZIP-only addresses replace the street line.  A ZIP-only "address" is
    # the ZIP itself or "City ST ZIP", with the city, state and ZIP columns still filled.
    bad = rng.random(n)
    placeholder = bad < spec.placeholder_rate
    zip_only = ~placeholder & (bad < spec.placeholder_rate + spec.zip_only_rate)
    junk = _take(_vocab(PLACEHOLDER_ADDRESSES), rng.integers(0, len(PLACEHOLDER_ADDRESSES), n))
    city_state_zip = _cat(city, _lit(" ", n), state, _lit(" ", n), zip_code)
    zip_line = _select([rng.random(n) < 0.6], [zip_code], city_state_zip)
    address = _select([placeholder, zip_only], [junk, zip_line], street)
    city = _blank(city, placeholder)
    state = _blank(state, placeholder)
    zip_code = _blank(zip_code, placeholder & (rng.random(n) < 0.5))

    # Dates of birth: a few typos, some US-style formatting.
    dob = pop.dob[people].copy()
    dob_typo = rng.random(n) < spec.dob_typo_rate
    dob[dob_typo] = _dob_typos(rng, dob[dob_typo])
    dob_text = _dob_text(dob, rng.random(n) < spec.dob_format_rate)
    missing_dob = np.zeros(n, dtype=bool)
    if spec.missing_dob_rate > 0:
        missing_dob = rng.random(n) < spec.missing_dob_rate
        dob_text = _blank(dob_text, missing_dob)

    # TINs: sometimes mistyped, usually dashed, often missing.
    tin = np.array(pop.tin[people])
    tin_typo = rng.random(n) < spec.tin_typo_rate
    tin[tin_typo] = _digit_typos(rng, tin[tin_typo])
    tin = _dashed(tin, rng.random(n) < 0.7)
    missing_tin = rng.random(n) < spec.missing_tin_rate
    tin = _blank(tin, missing_tin)

    # The per-subject request fields the statute requires; rarely one is left blank.
    blank = rng.random(n) < spec.missing_request_field_rate
    which = rng.integers(0, 3, n)
    tax_periods = _blank(_weighted_pick(rng, _TAX_PERIODS, n), blank & (which == 0))
    statute = _blank(_weighted_pick(rng, _STATUTES, n), blank & (which == 1))
    reason = _blank(_weighted_pick(rng, _REASONS, n), blank & (which == 2))

    counts.update(
        placeholder_addresses=int(placeholder.sum()),
        zip_only_addresses=int(zip_only.sum()),
        missing_tin=int(missing_tin.sum()),
        name_typos=int(typo.sum()),
        moved=int(moved.sum()),
        dob_typos=int(dob_typo.sum()),
        tin_typos=int(tin_typo.sum()),
        missing_request_fields=int(blank.sum()),
        nicknames=int(nicknamed.sum()),
        name_order_swaps=int(swapped.sum()),
        missing_dob=int(missing_dob.sum()),
        compound_surnames=int((pop.last2[people] >= 0).sum()),
    )
    return [
        _cat(_lit("Q", n), _digits(np.arange(1, n + 1), 8)),
        tin, first, last, dob_text, address, city, state, zip_code,
        tax_periods, statute, reason,
    ]


# --------------------------------------------------------------------------- output


def _csv_quoted(field: np.ndarray) -> np.ndarray:
    """Minimal CSV quoting, as the ``csv`` module does it: only a field holding a comma,
    quote or line break is quoted, and its quotes are doubled."""
    special = (field == _COMMA) | (field == _QUOTE) | (field == _CR) | (field == _LF)
    needs = special.any(axis=1)
    if not needs.any():
        return field
    quotes = np.flatnonzero((field == _QUOTE).any(axis=1))
    if quotes.size:  # never produced by this generator; kept so the writer is correct
        texts = [bytes(row[row != 0]).replace(b'"', b'""') for row in field[quotes]]
        width = max(field.shape[1], *(len(t) for t in texts))
        field = _pad(field, width)
        field[quotes] = np.array(texts, dtype=f"S{width}").view(_U8).reshape(-1, width)
    mark = np.where(needs, _QUOTE, 0).astype(_U8)[:, None]
    return _cat(mark, field, mark)


def _write_csv(fh: BinaryIO, header: Sequence[str], fields: Sequence[np.ndarray],
               chunk: int = 131_072) -> None:
    """One CSV file from field segments: rows of ``field,field,...\\r\\n``, padding removed."""
    fields = [_csv_quoted(f) for f in fields]
    n = fields[0].shape[0]
    fh.write(",".join(header).encode("ascii") + b"\r\n")
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        rows = hi - lo
        comma = np.full((rows, 1), _COMMA, dtype=_U8)
        parts: list[np.ndarray] = []
        for i, f in enumerate(fields):
            if i:
                parts.append(comma)
            parts.append(f[lo:hi])
        parts.append(np.broadcast_to(np.array([_CR, _LF], dtype=_U8), (rows, 2)))
        flat = _cat(*parts).ravel()
        fh.write(flat[flat != 0].tobytes())


def generate(spec: ScenarioSpec, out_dir: Path, *, progress: bool = False) -> ScenarioFiles:
    """Write custodian.csv, queries.csv, truth.csv and manifest.json into ``out_dir``.

    Same spec with the same faker and numpy versions gives byte-identical files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ScenarioFiles.in_dir(out_dir)
    tick = Progress(progress)
    rng_pop, rng_assign, rng_cust, rng_query = (
        np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(4)
    )

    non_filers = spec.queries - spec.true_matches
    size = spec.records + non_filers
    pop = _population(rng_pop, spec, size)
    tick(f"population: {size:,} people in {pop.n_households:,} households")

    # Filing is independent of household, so non-filers often live with filers: exactly
    # the relatives a weak rule mistakes for them.  Custodian rows are in random order.
    perm = rng_assign.permutation(size)
    filers, others = perm[:spec.records], perm[spec.records:]
    matched_slots = rng_assign.choice(spec.records, size=spec.true_matches, replace=False)
    order = rng_assign.permutation(spec.queries)
    query_people = np.concatenate([filers[matched_slots], others])[order]
    # Query row i is a filer iff it came from the first ``true_matches`` sources.
    matched_rows = np.flatnonzero(order < spec.true_matches)
    matched_records = matched_slots[order[matched_rows]]

    counts: dict[str, int] = {
        "queries": spec.queries,
        "records": spec.records,
        "true_matches": spec.true_matches,
        "people": size,
        "households": pop.n_households,
        "zip_codes": int(pop.geo.zip_num.size),
        "jr_sr_pairs": pop.jr_sr_pairs,
        "itin_holders": int(pop.is_itin.sum()),
    }

    custodian = _custodian_fields(rng_cust, spec, pop, filers)
    counts["protected_records"] = int(custodian[CUSTODIAN_HEADER.index("record_class")]
                                      .any(axis=1).sum())
    with open(files.custodian, "wb") as fh:
        _write_csv(fh, CUSTODIAN_HEADER, custodian)
    del custodian
    tick(f"custodian.csv: {spec.records:,} records")

    queries = _query_fields(rng_query, spec, pop, query_people, counts)
    with open(files.queries, "wb") as fh:
        _write_csv(fh, QUERY_HEADER, queries)
    del queries
    tick(f"queries.csv: {spec.queries:,} queries")

    m = matched_rows.size
    with open(files.truth, "wb") as fh:
        _write_csv(fh, TRUTH_HEADER, [
            _cat(_lit("Q", m), _digits(matched_rows + 1, 8)),
            _cat(_lit("C", m), _digits(matched_records + 1, 8)),
        ])
    tick(f"truth.csv: {m:,} pairs")

    manifest = {
        "generator": "protocol.adapters.scenario",
        "generator_version": GENERATOR_VERSION,
        "faker_version": _faker_version(),
        "numpy_version": np.__version__,
        "reference_date": str(REFERENCE_DATE),
        "spec": dataclasses.asdict(spec),
        "counts": counts,
        "files": {
            name: {"path": path.name, "sha256": sha256_file(path)}
            for name, path in (
                ("custodian", files.custodian),
                ("queries", files.queries),
                ("truth", files.truth),
            )
        },
    }
    files.manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tick("manifest.json")
    return files


# --------------------------------------------------------------------------- CLI


def ensure_scenario(spec: ScenarioSpec, out_dir: Path, *, progress: bool = False
                    ) -> tuple[ScenarioFiles, bool]:
    """The scenario of ``spec`` in ``out_dir``, generated only when the directory does not
    already hold it (its manifest records the exact spec and generator version); returns the
    files and whether they were generated now.  A directory holding another spec is
    regenerated, so a cached file never stands in for a different scenario."""
    files = ScenarioFiles.in_dir(Path(out_dir))
    try:
        manifest = json.loads(files.manifest.read_text())
    except (OSError, json.JSONDecodeError):
        manifest = {}
    same = (manifest.get("spec") == dataclasses.asdict(spec)
            and manifest.get("generator_version") == GENERATOR_VERSION)
    if same and all(p.exists() for p in (files.custodian, files.queries, files.truth)):
        return files, False
    return generate(spec, out_dir, progress=progress), True


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m protocol.adapters.scenario``: generate one scenario directory."""
    default = ScenarioSpec()
    parser = argparse.ArgumentParser(
        prog="python -m protocol.adapters.scenario",
        description="Generate the seeded synthetic matching scenario: custodian.csv, "
        "queries.csv, truth.csv (ground truth, for measurement only) and manifest.json. "
        "Without sizes it is the headline 1.28M x 1.3M scenario.",
    )
    parser.add_argument("--queries", type=int, default=default.queries,
                        help="requester queries (default %(default)s)")
    parser.add_argument("--records", type=int, default=default.records,
                        help="custodian records (default %(default)s)")
    parser.add_argument("--true-matches", type=int, default=None,
                        help="queries that are a custodian person (default: "
                        f"{default.true_matches} per {default.queries} queries, scaled)")
    parser.add_argument("--seed", type=int, default=default.seed,
                        help="generator seed (default %(default)s)")
    parser.add_argument("--error-model", choices=("baseline", "realistic"),
                        default="baseline",
                        help="request-file corruption: baseline (few typos) or realistic "
                        "(published record-linkage corruption models: typos, transpositions, "
                        "nicknames, swapped names and dates, missing values; see "
                        "ScenarioSpec.realistic) (default %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--quiet", action="store_true", help="no stage timings on stderr")
    args = parser.parse_args(argv)

    base = default.realistic() if args.error_model == "realistic" else default
    spec = dataclasses.replace(base, seed=args.seed).scaled(args.queries, args.records)
    if args.true_matches is not None:
        spec = dataclasses.replace(spec, true_matches=args.true_matches)
    files = generate(spec, args.out, progress=not args.quiet)
    print(f"wrote {files.custodian}, {files.queries}, {files.truth}, {files.manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
