"""Seeded synthetic population for the benchmark scenario (DESIGN §9).

Why synthetic: accuracy of a match rule is only measurable against ground truth, and
real taxpayer or enforcement data can never sit in a repository.  Why this much realism:
weak rules look fine on clean data; they misidentify people on data that has households,
Jr/Sr pairs, common names, stale addresses and placeholder junk.  Each of those is
generated here on purpose, at a rate the :class:`ScenarioSpec` names.

The population is built in one vectorized pass:

* a geography of cities and ZIP codes, consistent per state (ZIP ranges and names from
  ``faker``'s en_US address provider, states weighted by 2020 census population);
* households of 1-6 people sharing an address and usually a surname, some with a father
  and son of the same name (Jr/Sr), the suffix recorded only sometimes;
* people whose first and last names follow real US frequencies (``faker``'s weighted
  en_US name tables) and who each hold a unique SSN- or ITIN-format TIN;
* a custodian file (the filers) and a request file holding exactly ``true_matches``
  filers, everyone else in it being a non-filer, often a relative at a filer's address;
* noise on the request file: missing TINs, placeholder and ZIP-only addresses, name
  typos, moved addresses, suffix spelling, case and punctuation, date formats and typos.

Ground truth is written to a separate file and is for measurement only.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.dtypes import StringDType

__all__ = [
    "CUSTODIAN_HEADER",
    "PLACEHOLDER_ADDRESSES",
    "QUERY_HEADER",
    "TRUTH_HEADER",
    "ScenarioFiles",
    "ScenarioSpec",
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

#: Fixed reference date for ages, so output never depends on the day it is generated.
REFERENCE_DATE = np.datetime64("2025-06-01", "D")

_STR = StringDType()

# 2020 census resident population in thousands (50 states + DC): weights where people live.
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
# because the noise we inject ("Street" vs "St") must be something a normalizer can undo.
_STREET_SUFFIXES: tuple[tuple[str, str, float], ...] = (
    ("St", "Street", 0.30), ("Ave", "Avenue", 0.17), ("Rd", "Road", 0.13),
    ("Dr", "Drive", 0.13), ("Ln", "Lane", 0.07), ("Ct", "Court", 0.05),
    ("Blvd", "Boulevard", 0.03), ("Pl", "Place", 0.03), ("Cir", "Circle", 0.03),
    ("Ter", "Terrace", 0.02), ("Pkwy", "Parkway", 0.02), ("Trl", "Trail", 0.01),
    ("Hwy", "Highway", 0.01),
)

# Street names that are not people's names; the rest come from faker's name tables, the
# way faker's own en_US street_name_formats build them.
_COMMON_STREETS: tuple[str, ...] = (
    "Main", "Oak", "Pine", "Maple", "Cedar", "Elm", "Park", "Lake", "Hill", "Washington",
    "Lincoln", "Jefferson", "Church", "Spring", "Ridge", "Sunset", "Highland", "Forest",
    "River", "Mill", "Center", "Walnut", "Chestnut", "Willow", "Meadow", "1st", "2nd", "3rd",
    "4th", "5th", "6th", "7th", "8th", "9th", "10th", "11th", "12th",
)

# Household size distribution, 1..6 people (roughly the US household size shares).
_HOUSEHOLD_SIZES = np.array([0.28, 0.35, 0.15, 0.13, 0.06, 0.03])

_TAX_PERIODS: tuple[str, ...] = ("2023;2024", "2022;2023", "2024", "2021;2022;2023;2024")
_TAX_PERIOD_WEIGHTS = np.array([0.55, 0.2, 0.2, 0.05])
_STATUTES: tuple[str, ...] = ("26 U.S.C. 6103(i)(2)", "26 U.S.C. 6103(i)(1)")
_STATUTE_WEIGHTS = np.array([0.9, 0.1])
_REASONS: tuple[str, ...] = (
    "Locate subject of a pending nontax criminal investigation",
    "Locate subject of a final order of removal",
    "Locate witness in a pending federal proceeding",
    "Verify last known address for service of process",
)
_REASON_WEIGHTS = np.array([0.4, 0.4, 0.1, 0.1])

_JR_VARIANTS = np.array([" Jr", " Jr.", " JR", ", Jr."], dtype=_STR)
_SR_VARIANTS = np.array([" Sr", " Sr.", " SR"], dtype=_STR)

# TIN spaces, linearised.  SSN: area 001-899 except 666, group 01-99, serial 0001-9999.
# ITIN: area 900-999, group 70-88, serial 0001-9999.
_SSN_AREAS = 898
_ITIN_GROUPS = 19
_SERIALS = 9999


@dataclass(frozen=True)
class ScenarioSpec:
    """Every knob of the synthetic population; rates are per query unless said otherwise.

    The defaults are the headline scenario.  ``scaled`` keeps every rate and scales the
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
    abbreviation_rate: float = 0.35
    case_noise_rate: float = 0.30
    whitespace_noise_rate: float = 0.02
    dob_format_rate: float = 0.08
    dob_typo_rate: float = 0.005
    tin_typo_rate: float = 0.002
    missing_request_field_rate: float = 0.002
    custodian_dob_format_rate: float = 0.01
    itin_rate: float = 0.04
    protected_rate: float = 0.001
    #: Share of households with a male head and >= 2 members that hold a Jr/Sr pair.
    jr_sr_rate: float = 0.03
    #: Chance that a Jr/Sr suffix is written down in a given file.
    suffix_recorded_rate: float = 0.35
    #: People per ZIP code; sets how often common names collide within a ZIP.
    persons_per_zip: int = 6_000

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

    def scaled(self, queries: int, records: int) -> ScenarioSpec:
        """Same population shape at another size: match share of the request file kept."""
        share = self.true_matches / self.queries
        matches = max(1, round(share * queries))
        matches = min(matches, queries, records)
        return dataclasses.replace(
            self, queries=queries, records=records, true_matches=matches
        )


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


class _Progress:
    """Stage timings on stderr, so a full-scale run shows where its time goes."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, stage: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"[{elapsed:7.2f}s] {stage}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class _NameTables:
    female: np.ndarray
    female_p: np.ndarray
    male: np.ndarray
    male_p: np.ndarray
    last: np.ndarray
    last_p: np.ndarray


def _weighted(table: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    names = np.array(list(table.keys()), dtype=_STR)
    weights = np.array(list(table.values()), dtype=np.float64)
    return names, weights / weights.sum()


def _name_tables() -> _NameTables:
    """US first (by sex) and last name frequencies as maintained in faker's en_US tables."""
    from faker.providers.person.en_US import Provider as PersonProvider

    female, female_p = _weighted(PersonProvider.first_names_female)
    male, male_p = _weighted(PersonProvider.first_names_male)
    last, last_p = _weighted(PersonProvider.last_names)
    return _NameTables(female, female_p, male, male_p, last, last_p)


def _faker_address_tables() -> tuple[dict[str, tuple[int, int]], tuple[str, ...], tuple[str, ...]]:
    from faker.providers.address.en_US import Provider as AddressProvider

    return (
        dict(AddressProvider.states_postcode),
        tuple(AddressProvider.city_prefixes),
        tuple(AddressProvider.city_suffixes),
    )


def _faker_version() -> str:
    import faker

    return str(faker.VERSION)


# --------------------------------------------------------------------------- helpers


def _sample(rng: np.random.Generator, values: np.ndarray, p: np.ndarray, n: int) -> np.ndarray:
    return values[rng.choice(len(values), size=n, p=p)]


def _str_of_int(values: np.ndarray, width: int = 0) -> np.ndarray:
    out = np.asarray(values).astype(_STR)
    return np.strings.zfill(out, width) if width else out


def _cat(*parts: np.ndarray | str) -> np.ndarray:
    """Element-wise concatenation of string arrays and scalars."""
    out = parts[0]
    for part in parts[1:]:
        out = np.strings.add(out, part)
    return np.asarray(out, dtype=_STR)


def _unique_draws(rng: np.random.Generator, space: int, n: int) -> np.ndarray:
    """``n`` distinct integers from ``[0, space)``, in random order, without a Python loop
    over rows: oversample, drop repeats keeping first occurrences, top up if short."""
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
    """Distinct 9-digit TINs: SSN format mostly, ITIN format for a share.

    Returns the TIN digits as strings and a boolean ITIN mask.
    """
    is_itin = rng.random(n) < itin_rate
    n_itin = int(is_itin.sum())
    area = np.empty(n, dtype=np.int64)
    group = np.empty(n, dtype=np.int64)
    serial = np.empty(n, dtype=np.int64)

    ssn = _unique_draws(rng, _SSN_AREAS * 99 * _SERIALS, n - n_itin)
    a, rest = np.divmod(ssn, 99 * _SERIALS)
    g, s = np.divmod(rest, _SERIALS)
    a = a + 1
    a = a + (a >= 666)  # area 666 is never issued
    area[~is_itin], group[~is_itin], serial[~is_itin] = a, g + 1, s + 1

    itin = _unique_draws(rng, 100 * _ITIN_GROUPS * _SERIALS, n_itin)
    a, rest = np.divmod(itin, _ITIN_GROUPS * _SERIALS)
    g, s = np.divmod(rest, _SERIALS)
    area[is_itin], group[is_itin], serial[is_itin] = a + 900, g + 70, s + 1

    digits = _cat(_str_of_int(area, 3), _str_of_int(group, 2), _str_of_int(serial, 4))
    return digits, is_itin


def _dash_tin(digits: np.ndarray) -> np.ndarray:
    return _cat(
        np.strings.slice(digits, 0, 3), "-", np.strings.slice(digits, 3, 5), "-",
        np.strings.slice(digits, 5, 9),
    )


def _as_bytes_matrix(values: np.ndarray, extra: int) -> tuple[np.ndarray, np.ndarray, int]:
    """ASCII strings as a zero-padded uint8 matrix with ``extra`` spare columns."""
    encoded = np.strings.encode(values, "ascii")
    lengths = np.strings.str_len(encoded).astype(np.int64)
    width = int(lengths.max(initial=0)) + extra
    matrix = encoded.astype(f"S{width}").view(np.uint8).reshape(len(values), width)
    return matrix.copy(), lengths, width


def _from_bytes_matrix(matrix: np.ndarray) -> np.ndarray:
    width = matrix.shape[1]
    packed = np.ascontiguousarray(matrix).view(f"S{width}").reshape(-1)
    return np.strings.decode(packed, "ascii").astype(_STR)


def _typos(rng: np.random.Generator, names: np.ndarray) -> np.ndarray:
    """One keyboard-style edit per name (substitute, delete, transpose or double a
    letter), never on the first letter, which people rarely get wrong."""
    if names.size == 0:
        return names
    mat, lengths, width = _as_bytes_matrix(names, extra=2)
    n = len(names)
    rows = np.arange(n)
    kind = rng.integers(0, 4, size=n)
    # Names of two letters only get substitutions; transpositions need three.
    kind = np.where(lengths < 3, 0, kind)
    kind = np.where((kind == 2) & (lengths < 4), 0, kind)
    span = np.maximum(lengths - 1, 1)
    pos = 1 + (rng.random(n) * span).astype(np.int64)
    pos = np.minimum(pos, np.maximum(lengths - 1, 1))
    tpos = np.minimum(pos, np.maximum(lengths - 2, 1))

    # Transposing two equal letters changes nothing: substitute instead.
    same = mat[rows, tpos] == mat[rows, np.minimum(tpos + 1, width - 1)]
    kind = np.where((kind == 2) & same, 0, kind)

    out = mat.copy()
    cols = np.arange(width)[None, :]

    sub = kind == 0
    letter = (ord("a") + rng.integers(0, 26, size=n)).astype(np.uint8)
    clash = letter == mat[rows, pos]
    letter = np.where(clash, ord("a") + (letter - ord("a") + 1) % 26, letter).astype(np.uint8)
    out[rows[sub], pos[sub]] = letter[sub]

    dele = kind == 1
    src = np.minimum(cols + (cols >= pos[:, None]), width - 1)
    shifted = np.take_along_axis(mat, src, axis=1)
    out[dele] = shifted[dele]

    tr = kind == 2
    r = rows[tr]
    out[r, tpos[tr]] = mat[r, tpos[tr] + 1]
    out[r, tpos[tr] + 1] = mat[r, tpos[tr]]

    ins = kind == 3
    src = np.maximum(cols - (cols > pos[:, None]), 0)
    doubled = np.take_along_axis(mat, src, axis=1)
    out[ins] = doubled[ins]
    return _from_bytes_matrix(out)


def _digit_typos(rng: np.random.Generator, digits: np.ndarray) -> np.ndarray:
    """Swap two adjacent, different digits of a 9-digit TIN, or change one digit."""
    if digits.size == 0:
        return digits
    mat, _, _ = _as_bytes_matrix(digits, extra=0)
    n = len(digits)
    rows = np.arange(n)
    pos = rng.integers(0, 8, size=n)
    a, b = mat[rows, pos].copy(), mat[rows, pos + 1].copy()
    swap = a != b
    mat[rows[swap], pos[swap]] = b[swap]
    mat[rows[swap], pos[swap] + 1] = a[swap]
    bump = ~swap
    mat[rows[bump], pos[bump]] = (ord("0") + (a[bump] - ord("0") + 1) % 10).astype(np.uint8)
    return _from_bytes_matrix(mat)


def _dob_typos(rng: np.random.Generator, dob: np.ndarray) -> np.ndarray:
    """A day off by one, a decade digit wrong, or day and month swapped where valid."""
    years = dob.astype("datetime64[Y]")
    months = dob.astype("datetime64[M]")
    month_idx = (months - years.astype("datetime64[M]")).astype(np.int64)  # 0..11
    day_idx = (dob - months.astype("datetime64[D]")).astype(np.int64)  # 0..30
    kind = rng.integers(0, 3, size=dob.size)
    kind = np.where((kind == 2) & ((day_idx > 11) | (day_idx == month_idx)), 0, kind)
    off_by_one = dob + np.where(rng.random(dob.size) < 0.5, -1, 1).astype("timedelta64[D]")
    decade = np.where(rng.random(dob.size) < 0.5, -10, 10).astype("timedelta64[Y]")
    wrong_year = ((years + decade).astype("datetime64[M]") + month_idx.astype("timedelta64[M]"))
    wrong_year = wrong_year.astype("datetime64[D]") + day_idx.astype("timedelta64[D]")
    swapped = (years.astype("datetime64[M]") + day_idx.astype("timedelta64[M]"))
    swapped = swapped.astype("datetime64[D]") + month_idx.astype("timedelta64[D]")
    return np.select([kind == 0, kind == 1], [off_by_one, wrong_year], swapped)


def _format_dob(dob: np.ndarray, us_format: np.ndarray) -> np.ndarray:
    iso = np.datetime_as_string(dob, unit="D").astype(_STR)
    us = _cat(
        np.strings.slice(iso, 5, 7), "/", np.strings.slice(iso, 8, 10), "/",
        np.strings.slice(iso, 0, 4),
    )
    return np.where(us_format, us, iso).astype(_STR)


def _pick(rng: np.random.Generator, options: Sequence[str], p: np.ndarray, n: int) -> np.ndarray:
    return _sample(rng, np.array(options, dtype=_STR), p / p.sum(), n)


# --------------------------------------------------------------------------- population


@dataclass
class _Geography:
    zip_code: np.ndarray  # str, one per zip
    city: np.ndarray  # str, one per zip
    state: np.ndarray  # str, one per zip


def _geography(rng: np.random.Generator, n_zips: int, names: _NameTables) -> _Geography:
    """Cities with ZIP codes inside their state's real ZIP range."""
    ranges, prefixes, suffixes = _faker_address_tables()
    states = np.array(list(_STATE_POPULATION), dtype=_STR)
    weights = np.array(list(_STATE_POPULATION.values()), dtype=np.float64)
    n_cities = max(1, math.ceil(n_zips / 2.5))
    city_state = rng.choice(len(states), size=n_cities, p=weights / weights.sum())

    # City names follow faker's en_US city_formats: prefix/first name/last name + suffix.
    first = _sample(rng, np.concatenate([names.female, names.male]),
                    np.concatenate([names.female_p, names.male_p]) / 2, n_cities)
    last = _sample(rng, names.last, names.last_p, n_cities)
    prefix = np.array(prefixes, dtype=_STR)[rng.integers(0, len(prefixes), n_cities)]
    suffix = np.array(suffixes, dtype=_STR)[rng.integers(0, len(suffixes), n_cities)]
    fmt = rng.integers(0, 4, size=n_cities)
    city_names = np.select(
        [fmt == 0, fmt == 1, fmt == 2],
        [_cat(prefix, " ", first, suffix), _cat(prefix, " ", first), _cat(first, suffix)],
        _cat(last, suffix),
    ).astype(_STR)

    zip_city = np.concatenate([
        np.arange(min(n_cities, n_zips)),
        rng.integers(0, n_cities, size=max(0, n_zips - n_cities)),
    ])
    zip_state = city_state[zip_city]
    zip_num = np.empty(n_zips, dtype=np.int64)
    for s in np.unique(zip_state):  # one pass per state, not per row
        members = np.flatnonzero(zip_state == s)
        lo, hi = ranges[str(states[s])]
        size = hi - lo + 1
        zip_num[members] = lo + rng.choice(size, size=members.size, replace=members.size > size)
    return _Geography(
        zip_code=_str_of_int(zip_num, 5), city=city_names[zip_city], state=states[zip_state]
    )


@dataclass
class _Population:
    """Everyone who exists, filers or not; arrays indexed by person or by household."""

    hh: np.ndarray  # person -> household
    first: np.ndarray
    last: np.ndarray
    dob: np.ndarray  # datetime64[D]
    tin: np.ndarray  # 9 digits
    is_itin: np.ndarray
    suffix: np.ndarray  # 0 none, 1 Jr, 2 Sr
    # Households:
    n_households: int
    house_no: np.ndarray
    street: np.ndarray
    suffix_idx: np.ndarray
    suffix_style: np.ndarray  # 0 abbreviation, 1 full word: how the custodian writes it
    unit: np.ndarray  # "" or the unit number
    zip_idx: np.ndarray
    geo: _Geography
    jr_sr_pairs: int


def _ages_to_dob(rng: np.random.Generator, age_years: np.ndarray) -> np.ndarray:
    days = np.floor(age_years * 365.25).astype(np.int64) + rng.integers(0, 365, age_years.size)
    return REFERENCE_DATE - days.astype("timedelta64[D]")


def _population(rng: np.random.Generator, spec: ScenarioSpec, size: int) -> _Population:
    names = _name_tables()
    n_zips = max(3, math.ceil(size / spec.persons_per_zip))
    geo = _geography(rng, n_zips, names)

    # Households: draw sizes until they cover everyone, trim the last one.
    mean = float((_HOUSEHOLD_SIZES * np.arange(1, 7)).sum())
    guess = int(size / mean * 1.1) + 16
    sizes = rng.choice(np.arange(1, 7), size=guess, p=_HOUSEHOLD_SIZES)
    while sizes.sum() < size:
        sizes = np.concatenate([sizes, rng.choice(np.arange(1, 7), size=guess, p=_HOUSEHOLD_SIZES)])
    ends = np.cumsum(sizes)
    n_h = int(np.searchsorted(ends, size) + 1)
    sizes = sizes[:n_h].copy()
    sizes[-1] -= int(ends[n_h - 1] - size)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    hh = np.repeat(np.arange(n_h), sizes)
    role = np.arange(size) - starts[hh]

    # Household address.
    street_kind = rng.random(n_h)
    street = np.where(
        street_kind < 0.45,
        _sample(rng, names.last, names.last_p, n_h),
        np.where(
            street_kind < 0.70,
            _sample(rng, names.male, names.male_p, n_h),
            np.array(_COMMON_STREETS, dtype=_STR)[rng.integers(0, len(_COMMON_STREETS), n_h)],
        ),
    ).astype(_STR)
    suffix_p = np.array([w for _, _, w in _STREET_SUFFIXES])
    suffix_idx = rng.choice(len(_STREET_SUFFIXES), size=n_h, p=suffix_p / suffix_p.sum())
    suffix_style = (rng.random(n_h) < 0.15).astype(np.int64)
    house_no = np.exp(rng.uniform(np.log(10), np.log(20000), n_h)).astype(np.int64)
    has_unit = rng.random(n_h) < 0.12
    unit_no = rng.integers(1, 40, n_h).astype(_STR)
    unit_letter = np.array(["", "A", "B", "C"], dtype=_STR)[rng.integers(0, 4, n_h)]
    unit = np.where(has_unit, _cat(unit_no, unit_letter), "").astype(_STR)
    zip_idx = rng.integers(0, n_zips, n_h)

    # Household head, partner, then children or other relatives.
    head = starts[hh] == np.arange(size)
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
    young = age < 16
    age = np.where(young, rng.uniform(18, 70, size), age)  # an adult relative instead
    age = np.maximum(age, 16.0)

    surname = _sample(rng, names.last, names.last_p, n_h)
    own_surname = rng.random(size) < np.where(role == 1, 0.3, 0.1)
    last = np.where(
        head | ~own_surname, surname[hh], _sample(rng, names.last, names.last_p, size)
    ).astype(_STR)
    first = np.where(
        male,
        _sample(rng, names.male, names.male_p, size),
        _sample(rng, names.female, names.female_p, size),
    ).astype(_STR)

    # Jr/Sr: a father heading the household and a son of the same name living with him.
    jr_household = head_male & (sizes >= 2) & (rng.random(n_h) < spec.jr_sr_rate)
    jr_h = np.flatnonzero(jr_household)
    father = starts[jr_h]
    son = starts[jr_h] + sizes[jr_h] - 1
    father_age = rng.uniform(44, 88, jr_h.size)
    age[father] = father_age
    age[son] = father_age - rng.uniform(20, 32, jr_h.size)
    male[son] = True
    first[son] = first[father]
    last[son] = last[father]
    suffix = np.zeros(size, dtype=np.int8)
    suffix[son] = 1
    suffix[father] = 2

    dob = _ages_to_dob(rng, age)
    tin, is_itin = _tins(rng, size, spec.itin_rate)
    return _Population(
        hh=hh, first=first, last=last, dob=dob, tin=tin, is_itin=is_itin, suffix=suffix,
        n_households=n_h, house_no=house_no, street=street, suffix_idx=suffix_idx,
        suffix_style=suffix_style, unit=unit, zip_idx=zip_idx, geo=geo,
        jr_sr_pairs=int(jr_h.size),
    )


def _suffix_table() -> np.ndarray:
    """(suffix, style) -> spelling; styles: 0 "St", 1 "Street", 2 "St."."""
    return np.array(
        [[abbr, full, abbr + "."] for abbr, full, _ in _STREET_SUFFIXES], dtype=_STR
    )


def _street_address(pop: _Population, hh: np.ndarray, style: np.ndarray,
                    unit_word: np.ndarray | str) -> np.ndarray:
    spelled = _suffix_table()[pop.suffix_idx[hh], style]
    base = _cat(_str_of_int(pop.house_no[hh]), " ", pop.street[hh], " ", spelled)
    unit = pop.unit[hh]
    return np.where(unit == "", base, _cat(base, unit_word, unit)).astype(_STR)


def _with_suffix(rng: np.random.Generator, pop: _Population, people: np.ndarray,
                 last: np.ndarray, rate: float) -> np.ndarray:
    """Write the Jr/Sr suffix after the surname, but only sometimes, as real files do."""
    kind = pop.suffix[people]
    recorded = (kind > 0) & (rng.random(people.size) < rate)
    jr = _JR_VARIANTS[rng.integers(0, len(_JR_VARIANTS), people.size)]
    sr = _SR_VARIANTS[rng.integers(0, len(_SR_VARIANTS), people.size)]
    tag = np.where(kind == 1, jr, sr)
    return np.where(recorded, _cat(last, tag), last).astype(_STR)


# --------------------------------------------------------------------------- the two files


def _custodian_columns(rng: np.random.Generator, spec: ScenarioSpec, pop: _Population,
                       people: np.ndarray) -> dict[str, np.ndarray]:
    n = people.size
    hh = pop.hh[people]
    geo = pop.geo
    zip_idx = pop.zip_idx[hh]
    tax = np.exp(rng.normal(np.log(650_000), 1.1, n)).astype(np.int64)
    tax = np.where(rng.random(n) < 0.08, 0, np.minimum(tax, 5_000_000_000))
    record_class = np.where(rng.random(n) < spec.protected_rate, "protected", "").astype(_STR)
    return {
        "record_id": _cat("C", _str_of_int(np.arange(1, n + 1), 8)),
        "tin": pop.tin[people],
        "first_name": pop.first[people],
        "last_name": _with_suffix(rng, pop, people, pop.last[people], spec.suffix_recorded_rate),
        "dob": _format_dob(pop.dob[people], rng.random(n) < spec.custodian_dob_format_rate),
        "address": _street_address(pop, hh, pop.suffix_style[hh], " Apt "),
        "city": geo.city[zip_idx],
        "state": geo.state[zip_idx],
        "zip": geo.zip_code[zip_idx],
        "record_class": record_class,
        "tax_paid_cents": _str_of_int(tax),
    }


def _case_noise(values: np.ndarray, upper: np.ndarray, lower: np.ndarray) -> np.ndarray:
    return np.where(
        upper, np.strings.upper(values), np.where(lower, np.strings.lower(values), values)
    ).astype(_STR)


def _query_columns(rng: np.random.Generator, spec: ScenarioSpec, pop: _Population,
                   people: np.ndarray, counts: dict[str, int]) -> dict[str, np.ndarray]:
    n = people.size
    geo = pop.geo

    # Names, with typos in one of the two.
    first = pop.first[people].copy()
    last = pop.last[people].copy()
    typo = rng.random(n) < spec.name_typo_rate
    in_first = rng.random(n) < 0.5
    idx = np.flatnonzero(typo & in_first)
    first[idx] = _typos(rng, first[idx])
    idx = np.flatnonzero(typo & ~in_first)
    last[idx] = _typos(rng, last[idx])
    last = _with_suffix(rng, pop, people, last, spec.suffix_recorded_rate)

    # Address: the household's, or a previous one (another household's) if they moved.
    hh = pop.hh[people]
    moved = rng.random(n) < spec.moved_rate
    other = rng.integers(0, max(pop.n_households - 1, 1), n)
    other = np.where(other >= hh, other + 1, other) % pop.n_households
    addr_hh = np.where(moved & (pop.n_households > 1), other, hh)
    style = pop.suffix_style[addr_hh]
    restyle = rng.random(n) < spec.abbreviation_rate
    style = np.where(restyle, (style + rng.integers(1, 3, n)) % 3, style)
    unit_word = np.array([" Apt ", " Apt. ", " APT "], dtype=_STR)[rng.choice(3, n, p=[0.6, 0.3, 0.1])]
    address = _street_address(pop, addr_hh, style, unit_word)
    zip_idx = pop.zip_idx[addr_hh]
    city = geo.city[zip_idx]
    state = geo.state[zip_idx]
    zip_code = geo.zip_code[zip_idx]

    # Case and whitespace noise on the free-text fields.
    case = rng.random(n)
    upper = case < spec.case_noise_rate * 0.85
    lower = (case >= spec.case_noise_rate * 0.85) & (case < spec.case_noise_rate)
    first, last, address, city = (_case_noise(v, upper, lower) for v in (first, last, address, city))
    spaced = rng.random(n) < spec.whitespace_noise_rate
    address = np.where(spaced, np.strings.replace(address, " ", "  ", 1), address).astype(_STR)
    padded = rng.random(n) < spec.whitespace_noise_rate
    last = np.where(padded, _cat(last, " "), last).astype(_STR)

    # Placeholder and ZIP-only addresses replace the whole address block.
    bad = rng.random(n)
    placeholder = bad < spec.placeholder_rate
    zip_only = (bad >= spec.placeholder_rate) & (bad < spec.placeholder_rate + spec.zip_only_rate)
    junk = np.array(PLACEHOLDER_ADDRESSES, dtype=_STR)[rng.integers(0, len(PLACEHOLDER_ADDRESSES), n)]
    keep_zip = rng.random(n) < 0.5
    address = np.where(placeholder, junk, np.where(zip_only, "", address)).astype(_STR)
    city = np.where(placeholder | zip_only, "", city).astype(_STR)
    state = np.where(placeholder | zip_only, "", state).astype(_STR)
    zip_code = np.where(placeholder & ~keep_zip, "", zip_code).astype(_STR)

    # Dates of birth: a few typos, some US-style formatting.
    dob = pop.dob[people].copy()
    dob_typo = rng.random(n) < spec.dob_typo_rate
    dob[dob_typo] = _dob_typos(rng, dob[dob_typo])
    dob_text = _format_dob(dob, rng.random(n) < spec.dob_format_rate)

    # TINs: often missing, sometimes mistyped, dashed or not.
    tin = pop.tin[people].copy()
    tin_typo = rng.random(n) < spec.tin_typo_rate
    tin[tin_typo] = _digit_typos(rng, tin[tin_typo])
    tin = np.where(rng.random(n) < 0.7, _dash_tin(tin), tin).astype(_STR)
    missing_tin = rng.random(n) < spec.missing_tin_rate
    tin = np.where(missing_tin, "", tin).astype(_STR)

    # The per-subject request fields the statute requires; rarely one is left blank.
    tax_periods = _pick(rng, _TAX_PERIODS, _TAX_PERIOD_WEIGHTS, n)
    statute = _pick(rng, _STATUTES, _STATUTE_WEIGHTS, n)
    reason = _pick(rng, _REASONS, _REASON_WEIGHTS, n)
    blank = rng.random(n) < spec.missing_request_field_rate
    which = rng.integers(0, 3, n)
    tax_periods = np.where(blank & (which == 0), "", tax_periods).astype(_STR)
    statute = np.where(blank & (which == 1), "", statute).astype(_STR)
    reason = np.where(blank & (which == 2), "", reason).astype(_STR)

    counts.update(
        placeholder_addresses=int(placeholder.sum()),
        zip_only_addresses=int(zip_only.sum()),
        missing_tin=int(missing_tin.sum()),
        name_typos=int(typo.sum()),
        moved=int(moved.sum()),
        dob_typos=int(dob_typo.sum()),
        tin_typos=int(tin_typo.sum()),
        missing_request_fields=int(blank.sum()),
    )
    return {
        "record_id": _cat("Q", _str_of_int(np.arange(1, n + 1), 8)),
        "tin": tin,
        "first_name": first,
        "last_name": last,
        "dob": dob_text,
        "address": address,
        "city": city,
        "state": state,
        "zip": zip_code,
        "tax_periods": tax_periods,
        "statute": statute,
        "reason": reason,
    }


# --------------------------------------------------------------------------- output


def _write_csv(path: Path, header: Sequence[str], columns: dict[str, np.ndarray],
               chunk: int = 250_000) -> int:
    """Write columns as RFC 4180 CSV.

    Rows are joined with plain commas in bulk; the rare row whose text then has the wrong
    comma count or a quote or line break (a field like "Lee, Jr.") is re-rendered by the
    csv module, which quotes exactly the fields that need it.
    """
    cols = [np.asarray(columns[name], dtype=_STR) for name in header]
    n = len(cols[0]) if cols else 0
    separators = len(header) - 1
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(",".join(header) + "\n")
        for lo in range(0, n, chunk):
            parts = [c[lo:lo + chunk] for c in cols]
            rows = parts[0]
            for part in parts[1:]:
                rows = np.strings.add(np.strings.add(rows, ","), part)
            odd = np.strings.count(rows, ",") != separators
            for special in ('"', "\n", "\r"):
                odd |= np.strings.find(rows, special) >= 0
            lines = rows.tolist()
            if odd.any():
                buffer = io.StringIO()
                writer = csv.writer(buffer, lineterminator="")
                for i in np.flatnonzero(odd).tolist():
                    buffer.seek(0)
                    buffer.truncate()
                    writer.writerow([str(p[i]) for p in parts])
                    lines[i] = buffer.getvalue()
            fh.write("\n".join(lines))
            fh.write("\n")
    return n


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def generate(spec: ScenarioSpec, out_dir: Path, *, progress: bool = False) -> ScenarioFiles:
    """Write custodian.csv, queries.csv, truth.csv and manifest.json into ``out_dir``.

    Same spec, same faker and numpy versions: byte-identical files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ScenarioFiles.in_dir(out_dir)
    tick = _Progress(progress)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(5)]
    rng_pop, rng_assign, rng_cust, rng_query, rng_order = streams

    non_filers = spec.queries - spec.true_matches
    size = spec.records + non_filers
    pop = _population(rng_pop, spec, size)
    tick(f"population: {size:,} people in {pop.n_households:,} households")

    # Filers versus everyone else is independent of household, so non-filers often live
    # with filers: exactly the relatives a weak rule mistakes for them.
    perm = rng_assign.permutation(size)
    filers, others = perm[:spec.records], perm[spec.records:]
    matched_slots = rng_assign.choice(spec.records, size=spec.true_matches, replace=False)
    query_people = np.concatenate([filers[matched_slots], others])
    query_order = rng_order.permutation(spec.queries)
    query_people = query_people[query_order]
    # Query row i holds a filer iff its source index is < true_matches.
    matched_rows = np.flatnonzero(query_order < spec.true_matches)
    matched_custodian_rows = matched_slots[query_order[matched_rows]]

    counts: dict[str, int] = {
        "queries": spec.queries,
        "records": spec.records,
        "true_matches": spec.true_matches,
        "people": size,
        "households": pop.n_households,
        "zip_codes": int(pop.geo.zip_code.size),
        "jr_sr_pairs": pop.jr_sr_pairs,
        "itin_holders": int(pop.is_itin.sum()),
    }

    custodian = _custodian_columns(rng_cust, spec, pop, filers)
    counts["protected_records"] = int((custodian["record_class"] == "protected").sum())
    _write_csv(files.custodian, CUSTODIAN_HEADER, custodian)
    custodian_ids = custodian["record_id"]
    del custodian
    tick(f"custodian.csv: {spec.records:,} records")

    queries = _query_columns(rng_query, spec, pop, query_people, counts)
    query_ids = queries["record_id"]
    _write_csv(files.queries, QUERY_HEADER, queries)
    del queries
    tick(f"queries.csv: {spec.queries:,} queries")

    truth = {
        "query_record_id": query_ids[matched_rows],
        "custodian_record_id": custodian_ids[matched_custodian_rows],
    }
    _write_csv(files.truth, TRUTH_HEADER, truth)
    tick(f"truth.csv: {matched_rows.size:,} pairs")

    manifest = {
        "generator": "benchmarks.scenario",
        "generator_version": GENERATOR_VERSION,
        "faker_version": _faker_version(),
        "numpy_version": np.__version__,
        "reference_date": str(REFERENCE_DATE),
        "spec": dataclasses.asdict(spec),
        "counts": counts,
        "files": {
            name: {"path": path.name, "sha256": _sha256(path)}
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.scenario``: generate one scenario directory."""
    default = ScenarioSpec()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scenario",
        description="Generate the seeded synthetic matching scenario (custodian, queries, "
        "ground truth). Without sizes it is the headline 1.28M x 1.3M scenario.",
    )
    parser.add_argument("--queries", type=int, default=default.queries,
                        help="requester queries (default %(default)s)")
    parser.add_argument("--records", type=int, default=default.records,
                        help="custodian records (default %(default)s)")
    parser.add_argument("--true-matches", type=int, default=None,
                        help="queries that are a custodian person (default: scaled from "
                        f"{default.true_matches} per {default.queries} queries)")
    parser.add_argument("--seed", type=int, default=default.seed,
                        help="seed of the generator (default %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--quiet", action="store_true", help="no stage timings on stderr")
    args = parser.parse_args(argv)

    spec = dataclasses.replace(default, seed=args.seed).scaled(args.queries, args.records)
    if args.true_matches is not None:
        spec = dataclasses.replace(spec, true_matches=args.true_matches)
    files = generate(spec, args.out, progress=not args.quiet)
    print(f"wrote {files.custodian}, {files.queries}, {files.truth}, {files.manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
