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

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from itertools import combinations

from protocol.crypto.encoding import LENGTH_BYTES, lp
from protocol.domain.records import (
    RULE_FIELDS,
    KeyRow,
    PersonRecord,
    encode_match_key,
    get_rule,
    independent_group,
    key_rows_bulk,
    normalize_name,
    normalize_tin,
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
    """The components of a match key after its rule prefix (each length-prefixed), as
    :func:`decode_match_key` reads them."""
    out = []
    at, end = start, len(key)
    while at < end:
        size = int.from_bytes(key[at:at + LENGTH_BYTES], "big")
        at += LENGTH_BYTES
        out.append(key[at:at + size].decode("utf-8"))
        at += size
    return tuple(out)


#: Query subjects whose keys are built and priced at a time.  A million-subject file has
#: tens of millions of keys, never all held at once; and a batch this small frees its rows
#: before the cyclic collector's youngest generation fills (700 new containers), so the
#: collector almost never runs: at 100k subjects a batch of 4,096 spent about 40% of the
#: estimate in some 5,800 collections, one of 32 about 2 collections.
_BATCH = 32

#: Keys per rule and subject, as ``query_match_keys_bulk`` returns them.
_Keys = Mapping[str, Sequence[Sequence[bytes]]]


@dataclass(frozen=True)
class _Layout:
    """Where a rule's fields sit in its keys: the fixed prefix, then per field its
    components (``RULE_FIELDS`` widths)."""

    widths: tuple[int, ...]
    prefix: bytes

    @classmethod
    def of(cls, rule_id: str) -> _Layout:
        return cls(widths=tuple(len(RULE_FIELDS[f]) for f in get_rule(rule_id).fields),
                   prefix=encode_match_key(rule_id, ()))

    def split(self, key: bytes) -> KeyRow:
        """A key's encoded components per field (what :func:`key_rows_bulk` would give)."""
        row = []
        at = len(self.prefix)
        for width in self.widths:
            begin = at
            for _ in range(width):
                at += LENGTH_BYTES + int.from_bytes(key[at:at + LENGTH_BYTES], "big")
            row.append(key[begin:at])
        return tuple(row)


def _row_batches(records: Sequence[PersonRecord], rules: Sequence[str], today: date,
                 keys: _Keys | None) -> Iterator[tuple[Sequence[PersonRecord],
                                                       dict[str, list[list[KeyRow]]]]]:
    """The subjects' keys per rule as rows, a batch of subjects at a time.

    Without ``keys`` they are built from the records.  With ``keys``, those are what is
    priced: a subject's rows built from its record are used where they join to exactly its
    given keys (so no key is parsed back), and its given keys are split otherwise.
    """
    layouts = {rule_id: _Layout.of(rule_id) for rule_id in rules}
    if keys is not None:
        for rule_id in rules:
            if len(keys[rule_id]) != len(records):
                raise ValueError(f"keys of rule {rule_id} are not one list per record")
    join = b"".join
    for lo in range(0, len(records), _BATCH):
        batch = records[lo:lo + _BATCH]
        rows = key_rows_bulk(batch, rules, today=today)
        if keys is not None:
            for rule_id in rules:
                layout, built = layouts[rule_id], rows[rule_id]
                for q, given in enumerate(keys[rule_id][lo:lo + _BATCH]):
                    mine = built[q]
                    if len(given) != len(mine) or any(
                            layout.prefix + join(row) != key
                            for row, key in zip(mine, given, strict=True)):
                        built[q] = [layout.split(key) for key in given]
        yield batch, rows


def _own_tins(records: Sequence[PersonRecord]) -> list[bytes | None]:
    """Each subject's own TIN as a key carries it (one length-prefixed component)."""
    return [None if (tin := normalize_tin(r.tin)) is None else lp(tin) for r in records]


class _Agreement:
    """:func:`_agreement` of encoded field components, computed once per distinct value
    (names, dates and ZIPs repeat across subjects); a TIN is priced by whether it is the
    subject's own, without being remembered (TINs do not repeat)."""

    def __init__(self, stats: PopulationStats) -> None:
        self.stats = stats
        self.tin_own = _agreement("tin", ("",), "", stats)
        self.tin_other = _agreement("tin", ("",), None, stats)
        self.memo: dict[str, dict[bytes, float]] = {}

    def table(self, field: str) -> dict[bytes, float]:
        """The remembered agreements of one (non-TIN) field."""
        return self.memo.setdefault(field, {})

    def of(self, field: str, encoded: bytes, own_tin: bytes | None) -> float:
        if field == "tin":
            return self.tin_own if encoded == own_tin else self.tin_other
        table = self.table(field)
        found = table.get(encoded)
        if found is None:
            found = table[encoded] = _agreement(field, _components(encoded, 0), None,
                                                self.stats)
        return found


def estimate_false_matches(
    records: Sequence[PersonRecord],
    rule_ids: Sequence[str],
    stats: PopulationStats,
    *,
    today: date,
    keys: _Keys | None = None,
) -> list[RuleEstimate]:
    """Expected false matches per rule for these query subjects (see the module text).

    ``keys`` may pass in ``query_match_keys_bulk(records, rule_ids)`` when the caller has
    it already; each key is priced from its components (as ``decode_match_key`` reads
    them).  Keys are priced one by one in file order, so the sum is the same to the last
    bit however they are batched.
    """
    rules = list(dict.fromkeys(rule_ids))
    agreement = _Agreement(stats)
    custodian = float(stats.custodian_records)
    totals = {rule_id: [0.0, 0, 0] for rule_id in rules}  # expected, queries, keys
    for batch, rows in _row_batches(records, rules, today, keys):
        own_tins = _own_tins(batch)
        for rule_id in rules:
            fields = get_rule(rule_id).fields
            namesake = _namesake(fields, stats)
            # A key carrying the subject's own TIN prices at exactly 0.0 (it meets nobody
            # else), so adding it changes nothing and it is skipped; every other TIN
            # prices the same, so a leading one is a constant factor.
            tin_at = fields.index("tin") if "tin" in fields and not agreement.tin_own else -1
            start, steps = custodian, list(enumerate(fields))
            if tin_at == 0:
                start, steps = custodian * agreement.tin_other, steps[1:]
            # per field in key order: its remembered agreements (None: the TIN)
            lookups = [(i, None if f == "tin" else agreement.table(f).get, f)
                       for i, f in steps]
            expected, queries, key_count = totals[rule_id]
            for own_tin, record_rows in zip(own_tins, rows[rule_id], strict=True):
                if not record_rows:
                    continue
                queries += 1
                key_count += len(record_rows)
                expected += namesake
                if not custodian:
                    continue  # an empty file: every key prices at 0.0, no statistic needed
                for row in record_rows:
                    if tin_at >= 0 and row[tin_at] == own_tin:
                        continue
                    p = start
                    for i, get, f in lookups:
                        found = None if get is None else get(row[i])
                        p *= agreement.of(f, row[i], own_tin) if found is None else found
                    expected += p
            totals[rule_id] = [expected, queries, key_count]
    return [RuleEstimate(rule_id=rule_id, queries=int(queries), keys=int(key_count),
                         expected_false_matches=float(expected))
            for rule_id, (expected, queries, key_count) in totals.items()]


#: A phonetic field adds nothing where the exact spelling of the same name is compared.
_IMPLIED_BY = {"first_phonetic": "first_name", "last_phonetic": "last_name"}


@dataclass(frozen=True)
class _Group:
    """How one group of independent rules is priced: the fields it prices (the union of
    its rules' fields, a phonetic code not beside its exact spelling), the fields several
    of its rules read (their keys must agree there), and per rule the positions in its
    keys of the fields it shares and of the priced fields it reads alone.  Choices of keys
    are made rule by rule: per rule, which of its shared fields an earlier rule fixed
    already (``bound``: position among its shared fields, field) and which it fixes."""

    rules: tuple[str, ...]
    shared_priced: tuple[str, ...]
    own_shared_at: tuple[tuple[int, ...], ...]
    own_priced_at: tuple[tuple[tuple[int, str], ...], ...]
    bound: tuple[tuple[tuple[int, str], ...], ...]
    binds: tuple[tuple[tuple[int, str], ...], ...]
    namesake: float

    @classmethod
    def of(cls, rules: tuple[str, ...], stats: PopulationStats) -> _Group:
        fields = [get_rule(r).fields for r in rules]
        union = list(dict.fromkeys(f for rule_fields in fields for f in rule_fields))
        priced = {f for f in union if _IMPLIED_BY.get(f) not in union}
        shared = tuple(f for f in union if sum(f in rf for rf in fields) > 1)
        own_shared = tuple(tuple(f for f in shared if f in rf) for rf in fields)
        earlier = [{f for own in own_shared[:j] for f in own} for j in range(len(rules))]
        return cls(rules=rules, shared_priced=tuple(f for f in shared if f in priced),
                   own_shared_at=tuple(tuple(rf.index(f) for f in own)
                                       for rf, own in zip(fields, own_shared, strict=True)),
                   own_priced_at=tuple(tuple((i, f) for i, f in enumerate(rf)
                                             if f in priced and f not in shared)
                                       for rf in fields),
                   bound=tuple(tuple((k, f) for k, f in enumerate(own) if f in before)
                               for own, before in zip(own_shared, earlier, strict=True)),
                   binds=tuple(tuple((k, f) for k, f in enumerate(own) if f not in before)
                               for own, before in zip(own_shared, earlier, strict=True)),
                   namesake=_namesake(union, stats))


def estimate_corroborated_false_matches(
        records: Sequence[PersonRecord], rule_ids: Sequence[str], corroboration: int,
        stats: PopulationStats, *, today: date, keys: _Keys | None = None) -> float:
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
    return sum(_corroborated_terms(records, rule_ids, corroboration, stats, today, keys))


def corroborated_false_matches_per_query(
        records: Sequence[PersonRecord], rule_ids: Sequence[str], corroboration: int,
        stats: PopulationStats, *, today: date, keys: _Keys | None = None) -> list[float]:
    """Each query's term of :func:`estimate_corroborated_false_matches` (a caller that prices
    a sample needs them for its sampling error).  ``keys`` as for
    :func:`estimate_false_matches`."""
    return list(_corroborated_terms(records, rule_ids, corroboration, stats, today, keys))


def _corroborated_terms(records: Sequence[PersonRecord], rule_ids: Sequence[str],
                        corroboration: int, stats: PopulationStats, today: date,
                        keys: _Keys | None) -> Iterator[float]:
    """Each query's corroborated term, in file order.

    A choice of keys prices as a product: the group's shared fields (equal in every key of
    the choice) times, per rule, the fields only that rule reads.  So the keys of each
    rule are summed per value of their shared fields first, and only those sums are
    combined: a few products per group instead of one per choice of keys, which is what
    kept a sample of 5,000 subjects from pricing in minutes.  The sums are combined rule
    by rule, each rule's looked up by the shared values fixed so far, so only choices
    that agree are visited (in the order of ``itertools.product``, so the total is the
    same to the last bit as filtering every combination).
    """
    rules = list(dict.fromkeys(rule_ids))
    groups = [_Group.of(g, stats) for g in combinations(rules, corroboration)
              if independent_group(g)]
    agreement = _Agreement(stats)
    custodian = float(stats.custodian_records)
    for batch, rows in _row_batches(records, rules, today, keys):
        for q, own_tin in enumerate(_own_tins(batch)):
            expected = 0.0
            for group in groups:
                # per rule: value of its shared fields -> (sum of its own fields' agreement
                # over its keys with that value, how many keys)
                sums: list[dict[tuple[bytes, ...], tuple[float, int]]] = []
                for rule_id, shared_at, own_at in zip(group.rules, group.own_shared_at,
                                                      group.own_priced_at, strict=True):
                    by_value: dict[tuple[bytes, ...], tuple[float, int]] = {}
                    for row in rows[rule_id][q]:
                        p = 1.0
                        for i, f in own_at:
                            p *= agreement.of(f, row[i], own_tin)
                        at_value = tuple(row[i] for i in shared_at)
                        total, count = by_value.get(at_value, (0.0, 0))
                        by_value[at_value] = (total + p, count + 1)
                    sums.append(by_value)
                for chosen, union in _agreeing_choices(group, sums):
                    p = custodian
                    for f in group.shared_priced:
                        p *= agreement.of(f, union[f], own_tin)
                    count = 1
                    for total, keys_at_value in chosen:
                        p *= total
                        count *= keys_at_value
                    expected += p + group.namesake * count
            yield expected


def _agreeing_choices(group: _Group, sums: Sequence[Mapping[tuple[bytes, ...],
                                                              tuple[float, int]]]
                      ) -> list[tuple[tuple[tuple[float, int], ...], dict[str, bytes]]]:
    """Every choice of one shared value per rule on which the group's keys agree (keys
    that disagree on a shared field: nobody holds both), as (the rules' sums, the shared
    field values), in product order."""
    partial: list[tuple[tuple[tuple[float, int], ...], dict[str, bytes]]] = [((), {})]
    for by_value, bound, binds in zip(sums, group.bound, group.binds, strict=True):
        index: dict[tuple[bytes, ...], list[tuple[tuple[bytes, ...], tuple[float, int]]]]
        index = {}
        for at_value, summed in by_value.items():
            index.setdefault(tuple(at_value[k] for k, _ in bound), []).append(
                (at_value, summed))
        extended = []
        for chosen, union in partial:
            for at_value, summed in index.get(tuple(union[f] for _, f in bound), ()):
                grown = union
                if binds:
                    grown = dict(union)
                    for k, f in binds:
                        grown[f] = at_value[k]
                extended.append(((*chosen, summed), grown))
        partial = extended
    return partial


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
