"""Expected false matches of a request before anyone signs it (docs/architecture.md, Recall
and misidentification).

A false match is a custodian record of *somebody else* whose match key equals one of the
keys a query evaluates.  For each query, rule and key this module prices that from
population statistics, field by field, assuming the fields of two different people agree
independently:

* a TIN belongs to one person, so a key carrying the query's own TIN meets nobody else; a
  transposed-TIN variant meets a random holder with probability ``N / tin_space``;
* names agree with the frequency of the name (or of its phonetic code) in the US name
  tables that the scenario generator draws from (``faker``'s weighted en_US tables);
* a date of birth agrees with probability ``1 / (365.25 * dob_span_years)``;
* a ZIP or a street address agrees with the share of the population living there;
* household structure adds the one correlated case: a father and son of the same name in
  one household (Jr/Sr), who share names and address but never a date of birth.

The sum over the request file is the expected number of false matches per rule, shown by
``psi-authority estimate`` and in ``issue``'s output.  Pure: the caller supplies the
records, the rules and the clock's date.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from itertools import combinations, product

from protocol.crypto.encoding import LENGTH_BYTES
from protocol.domain.records import (
    RULE_FIELDS,
    PersonRecord,
    encode_match_key,
    get_rule,
    independent_group,
    normalize_name,
    normalize_tin,
    query_match_keys_bulk,
)
from protocol.domain.variants import first_name_canonical, phonetic, surname_canonical

__all__ = ["PopulationStats", "RuleEstimate", "corroborated_false_matches_per_query",
           "estimate_corroborated_false_matches", "estimate_false_matches", "sample_total"]

#: Valid SSN area, group and serial numbers: the space a transposed TIN lands in.
SSN_SPACE = 898 * 99 * 9999


@dataclass(frozen=True)
class PopulationStats:
    """What the estimate assumes about the people behind the custodian's file.

    Defaults describe the US adult population as the synthetic scenario models it: about
    half of all people file, 6,000 people per ZIP code, household of 2.4 people on
    average, ages spread so that two random adults share a birth date as often as if
    births were uniform over 58 years, and about 0.9% of people living with a father or
    son of the same name whose suffix (Jr/Sr) is written down 35% of the time.
    """

    custodian_records: int
    custodian_share: float = 0.5
    persons_per_zip: int = 6_000
    household_size: float = 2.4
    dob_span_years: float = 58.0
    tin_space: int = SSN_SPACE
    namesake_share: float = 0.009
    suffix_recorded_rate: float = 0.35

    def __post_init__(self) -> None:
        if self.custodian_records < 0:
            raise ValueError("custodian_records must not be negative")
        if not 0 < self.custodian_share <= 1:
            raise ValueError("custodian_share must lie in (0, 1]")
        if min(self.persons_per_zip, self.household_size, self.dob_span_years,
               self.tin_space) <= 0:
            raise ValueError("population statistics must be positive")

    @property
    def population(self) -> float:
        """People the custodian's records are drawn from."""
        return self.custodian_records / self.custodian_share


@dataclass(frozen=True)
class RuleEstimate:
    """Expected false matches of one rule over a request file, and the keys it evaluates."""

    rule_id: str
    queries: int
    keys: int
    expected_false_matches: float


@dataclass(frozen=True)
class _NameTables:
    first: dict[str, float]
    last: dict[str, float]
    first_code: dict[str, float]
    last_code: dict[str, float]
    first_floor: float
    last_floor: float


@lru_cache(maxsize=1)
def _tables() -> _NameTables:
    """Name and phonetic-code frequencies from faker's weighted en_US tables (the
    generator's source); first names weigh both sexes equally."""
    from faker.providers.person.en_US import Provider

    def shares(weights: dict[str, float]) -> dict[str, float]:
        total = sum(weights.values())
        return {k: v / total for k, v in weights.items()}

    female = shares(dict(Provider.first_names_female))
    male = shares(dict(Provider.first_names_male))
    first: dict[str, float] = {}
    for table in (female, male):
        for name, share in table.items():
            key = normalize_name(name)
            first[key] = first.get(key, 0.0) + share / 2
    last = {normalize_name(k): v for k, v in shares(dict(Provider.last_names)).items()}
    first_code: dict[str, float] = {}
    for name, share in first.items():
        code = phonetic(first_name_canonical(name))
        first_code[code] = first_code.get(code, 0.0) + share
    last_code: dict[str, float] = {}
    for name, share in last.items():
        code = phonetic(surname_canonical(name))
        last_code[code] = last_code.get(code, 0.0) + share
    return _NameTables(first=first, last=last, first_code=first_code, last_code=last_code,
                       first_floor=min(first.values()), last_floor=min(last.values()))


def _agreement(field: str, values: tuple[str, ...], own_tin: str | None,
               stats: PopulationStats) -> float:
    """Probability that one other random person's ``field`` components equal ``values``."""
    tables = _tables()
    value = values[0]
    if field == "tin":
        return 0.0 if value == own_tin else 1.0 / stats.tin_space
    if field == "dob":
        return 1.0 / (365.25 * stats.dob_span_years)
    if field == "first_phonetic":
        return tables.first_code.get(value, tables.first_floor)
    if field == "last_phonetic":
        return tables.last_code.get(value, tables.last_floor)
    if field == "first_name":
        return tables.first.get(value, tables.first_floor)
    if field == "last_name":
        return tables.last.get(value, tables.last_floor)
    if field == "zip":
        return min(1.0, stats.persons_per_zip / stats.population)
    if field == "address":
        return min(1.0, stats.household_size / stats.population)
    return 1.0  # a field without a statistic: assume it tells nobody apart


def _namesake(rule_fields: Sequence[str], stats: PopulationStats) -> float:
    """Expected false matches per query from a same-name father or son at home (Jr/Sr):
    only rules that read names but no TIN and no date of birth can confuse them."""
    fields = set(rule_fields)
    if fields & {"tin", "dob"} or not fields & {"address", "zip"}:
        return 0.0
    if not fields & {"first_name", "first_phonetic"}:
        return 0.0
    # With the suffix in the key, they collide only when neither file wrote it down.
    same_key = ((1 - stats.suffix_recorded_rate) ** 2 if "last_name" in fields else 1.0)
    return stats.namesake_share * same_key * stats.custodian_share


def _components(key: bytes, start: int) -> tuple[str, ...]:
    """The components of a match key after its rule prefix (each length-prefixed): the
    hot path of :func:`decode_match_key`, for millions of keys."""
    out = []
    at, end = start, len(key)
    while at < end:
        size = int.from_bytes(key[at:at + LENGTH_BYTES], "big")
        at += LENGTH_BYTES
        out.append(key[at:at + size].decode("utf-8"))
        at += size
    return tuple(out)


def estimate_false_matches(
    records: Sequence[PersonRecord],
    rule_ids: Sequence[str],
    stats: PopulationStats,
    *,
    today: date,
    keys: Mapping[str, Sequence[Sequence[bytes]]] | None = None,
) -> list[RuleEstimate]:
    """Expected false matches per rule for these query subjects (see the module text).

    ``keys`` may pass in ``query_match_keys_bulk(records, rule_ids)`` when the caller has
    it already; each key is priced from its components (as ``decode_match_key`` reads
    them).
    """
    rules = list(dict.fromkeys(rule_ids))
    if keys is None:
        keys = query_match_keys_bulk(records, rules, today=today)
    own_tins = [normalize_tin(r.tin) for r in records]
    out = []
    for rule_id in rules:
        rule = get_rule(rule_id)
        widths = [len(RULE_FIELDS[f]) for f in rule.fields]
        start = len(encode_match_key(rule_id, ()))  # the rule's fixed key prefix
        namesake = _namesake(rule.fields, stats)
        memo: dict[tuple[str, tuple[str, ...], bool], float] = {}
        expected = 0.0
        key_count = queries = 0
        for own_tin, record_keys in zip(own_tins, keys[rule_id], strict=True):
            if not record_keys:
                continue
            queries += 1
            key_count += len(record_keys)
            expected += namesake
            for key in record_keys:
                comps = _components(key, start)
                p = float(stats.custodian_records)
                at = 0
                for f, width in zip(rule.fields, widths, strict=True):
                    values = comps[at:at + width]
                    at += width
                    memo_key = (f, values, values[0] == own_tin)
                    agree = memo.get(memo_key)
                    if agree is None:
                        agree = memo[memo_key] = _agreement(f, values, own_tin, stats)
                    p *= agree
                    if p == 0.0:
                        break
                expected += p
        out.append(RuleEstimate(rule_id=rule_id, queries=queries, keys=key_count,
                                expected_false_matches=expected))
    return out


#: A phonetic field adds nothing where the exact spelling of the same name is compared.
_IMPLIED_BY = {"first_phonetic": "first_name", "last_phonetic": "last_name"}

#: One parsed key: its components per field of its rule.
_Parsed = dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class _Group:
    """How one group of independent rules is priced: the fields it prices (the union of
    its rules' fields, a phonetic code not beside its exact spelling), the fields several
    of its rules read (their keys must agree there), and per rule the fields it shares and
    the priced fields it reads alone."""

    rules: tuple[str, ...]
    shared: tuple[str, ...]
    shared_priced: tuple[str, ...]
    own_shared: tuple[tuple[str, ...], ...]
    own_priced: tuple[tuple[str, ...], ...]
    namesake: float

    @classmethod
    def of(cls, rules: tuple[str, ...], stats: PopulationStats) -> _Group:
        fields = [get_rule(r).fields for r in rules]
        union = list(dict.fromkeys(f for rule_fields in fields for f in rule_fields))
        priced = {f for f in union if _IMPLIED_BY.get(f) not in union}
        shared = tuple(f for f in union if sum(f in rf for rf in fields) > 1)
        return cls(rules=rules, shared=shared,
                   shared_priced=tuple(f for f in shared if f in priced),
                   own_shared=tuple(tuple(f for f in shared if f in rf) for rf in fields),
                   own_priced=tuple(tuple(f for f in rf if f in priced and f not in shared)
                                    for rf in fields),
                   namesake=_namesake(union, stats))


def estimate_corroborated_false_matches(
    records: Sequence[PersonRecord],
    rule_ids: Sequence[str],
    corroboration: int,
    stats: PopulationStats,
    *,
    today: date,
    keys: Mapping[str, Sequence[Sequence[bytes]]] | None = None,
) -> float:
    """Expected false matches when a disclosure needs ``corroboration`` pairwise independent
    rules (docs/architecture.md, Recall and misidentification).

    Another person is disclosed only if one of their records carries, for every rule of
    some independent group, one of the query's keys.  Per query this sums, over every
    such group and every choice of one key per rule whose shared fields agree, the chance
    that a random other person agrees on the union of the group's fields (each field
    priced once; a phonetic code not again beside its exact spelling), plus the namesake
    term of that union: a union bound, so an upper estimate.  The sum of
    :func:`corroborated_false_matches_per_query`.
    """
    return sum(corroborated_false_matches_per_query(records, rule_ids, corroboration, stats,
                                                    today=today, keys=keys))


def corroborated_false_matches_per_query(
    records: Sequence[PersonRecord],
    rule_ids: Sequence[str],
    corroboration: int,
    stats: PopulationStats,
    *,
    today: date,
    keys: Mapping[str, Sequence[Sequence[bytes]]] | None = None,
) -> list[float]:
    """Each query's term of :func:`estimate_corroborated_false_matches` (a caller that prices
    a sample needs them for its sampling error).  ``keys`` as for
    :func:`estimate_false_matches`.

    A choice of keys prices as a product: the group's shared fields (equal in every key of
    the choice) times, per rule, the fields only that rule reads.  So the keys of each
    rule are summed per value of their shared fields first, and only those sums are
    combined: a few products per group instead of one per choice of keys, which is what
    kept a sample of 5,000 subjects from pricing in minutes.
    """
    rules = list(dict.fromkeys(rule_ids))
    if keys is None:
        keys = query_match_keys_bulk(records, rules, today=today)
    groups = [_Group.of(g, stats) for g in combinations(rules, corroboration)
              if independent_group(g)]
    layout = {}
    for rule_id in rules:
        rule = get_rule(rule_id)
        widths = [len(RULE_FIELDS[f]) for f in rule.fields]
        layout[rule_id] = (rule.fields, widths, len(encode_match_key(rule_id, ())))
    memo: dict[tuple[str, tuple[str, ...], bool], float] = {}

    def agree(f: str, v: tuple[str, ...], own_tin: str | None) -> float:
        memo_key = (f, v, v[0] == own_tin)
        found = memo.get(memo_key)
        if found is None:
            found = memo[memo_key] = _agreement(f, v, own_tin, stats)
        return found

    out: list[float] = []
    for q, record in enumerate(records):
        own_tin = normalize_tin(record.tin)
        parsed: dict[str, list[_Parsed]] = {}
        for rule_id in rules:
            fields, widths, start = layout[rule_id]
            parsed[rule_id] = []
            for key in keys[rule_id][q]:
                comps, at, values = _components(key, start), 0, {}
                for f, width in zip(fields, widths, strict=True):
                    values[f] = comps[at:at + width]
                    at += width
                parsed[rule_id].append(values)
        expected = 0.0
        for group in groups:
            # per rule: value of its shared fields -> (sum of its own fields' agreement
            # over its keys with that value, how many keys)
            sums: list[dict[tuple[tuple[str, ...], ...], tuple[float, int]]] = []
            for rule_id, shared, own in zip(group.rules, group.own_shared, group.own_priced,
                                            strict=True):
                by_value: dict[tuple[tuple[str, ...], ...], tuple[float, int]] = {}
                for values in parsed[rule_id]:
                    p = 1.0
                    for f in own:
                        p *= agree(f, values[f], own_tin)
                    at_value = tuple(values[f] for f in shared)
                    total, count = by_value.get(at_value, (0.0, 0))
                    by_value[at_value] = (total + p, count + 1)
                sums.append(by_value)
            for choice in product(*(s.items() for s in sums)):
                union: dict[str, tuple[str, ...]] = {}
                if any(union.setdefault(f, v) != v
                       for shared, (at_value, _) in zip(group.own_shared, choice, strict=True)
                       for f, v in zip(shared, at_value, strict=True)):
                    continue  # the keys disagree on a shared field: nobody holds both
                p = float(stats.custodian_records)
                for f in group.shared_priced:
                    p *= agree(f, union[f], own_tin)
                count = 1
                for _, (total, keys_at_value) in choice:
                    p *= total
                    count *= keys_at_value
                expected += p + group.namesake * count
        out.append(expected)
    return out


def sample_total(sample: Sequence[float], population: int) -> tuple[float, float]:
    """A population total estimated from a sample of its per-subject terms, and the
    standard error of that estimate (as for a simple random sample without replacement,
    with the finite-population correction: zero when the sample is everyone)."""
    n = len(sample)
    if n == 0:
        return 0.0, 0.0
    mean = sum(sample) / n
    if n == 1:
        return population * mean, 0.0
    variance = sum((x - mean) ** 2 for x in sample) / (n - 1)
    correction = max(0.0, 1 - n / population) if population else 0.0
    return population * mean, population * (variance * correction / n) ** 0.5
