"""The misidentification estimate (docs/architecture.md, Recall and misidentification):
priced from population statistics before matching, and checked against the false matches
measured on a generated scenario."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import date
from itertools import combinations, product
from pathlib import Path
from typing import cast

import pytest

from benchmarks import accuracy
from protocol.adapters import scenario
from protocol.cli.authority import main as authority_main
from protocol.domain import estimate as E
from protocol.domain import records as R
from protocol.domain import variants as V
from protocol.domain.estimate import (
    PopulationStats,
    corroborated_false_matches_per_query,
    estimate_corroborated_false_matches,
    estimate_false_matches,
)
from protocol.domain.records import (
    DEFAULT_RULES,
    MATCH_RULES,
    RULE_FIELDS,
    PersonRecord,
    Variant,
    encode_match_key,
    independent_group,
    key_components,
    key_rows_bulk,
    normalize_name,
    normalize_tin,
    normalize_zip,
    query_match_keys_bulk,
    read_query_csv,
    split_suffix,
)

TODAY = date(2025, 6, 15)
PERSON = PersonRecord(record_id="q1", tin="123-45-6789", first_name="Mary",
                      last_name="Smith", dob="1980-03-04", address="12 Main Street",
                      city="Springfield", state="IL", zip="62701")
STATS = PopulationStats(custodian_records=1_000_000)


def expected(rule_id: str, people: list[PersonRecord], stats: PopulationStats = STATS
             ) -> float:
    return estimate_false_matches(people, [rule_id], stats, today=TODAY)[0] \
        .expected_false_matches


def test_a_key_with_the_querys_own_tin_meets_nobody_else() -> None:
    assert expected("tin+dob", [PERSON]) == 0.0
    assert expected("tin+last_name", [PERSON]) == 0.0
    # a transposed TIN lands on a random holder: tiny but not zero, and it grows with the file
    small = expected("tin+dob+variants", [PERSON])
    assert small > 0.0
    assert expected("tin+dob+variants", [PERSON],
                    replace(STATS, custodian_records=2_000_000)) == pytest.approx(2 * small)
    # ... unless a ZIP is in the key: a bigger file spreads over more ZIP codes
    in_zip = expected("tin+last_phonetic+zip", [PERSON])
    assert expected("tin+last_phonetic+zip", [PERSON],
                    replace(STATS, custodian_records=2_000_000)) == pytest.approx(in_zip)


def test_common_names_and_fewer_fields_cost_more() -> None:
    rare = replace(PERSON, first_name="Zebediah", last_name="Quackenbush")
    assert expected("first+last+dob+zip", [PERSON]) > expected("first+last+dob+zip", [rare])
    assert expected("names_phonetic+dob", [PERSON]) > expected("names_phonetic+dob+zip",
                                                               [PERSON])
    # every variant key is another chance to meet somebody else
    assert expected("names_phonetic+dob+zip", [PERSON]) > expected("first+last+dob+zip",
                                                                   [PERSON])


def test_namesakes_at_home_price_the_address_rule() -> None:
    """Jr/Sr share names and address; the suffix in the key protects only when written."""
    address = expected("first+last+address", [PERSON])
    never_written = expected("first+last+address", [PERSON],
                             replace(STATS, suffix_recorded_rate=0.0))
    always_written = expected("first+last+address", [PERSON],
                              replace(STATS, suffix_recorded_rate=1.0))
    assert never_written > address > always_written > 0.0
    assert STATS.namesake_share * STATS.custodian_share == pytest.approx(
        never_written - always_written)


def test_counts_keys_and_skips_subjects_without_one() -> None:
    got = estimate_false_matches([PERSON, replace(PERSON, dob="")], ["tin+dob+variants"],
                                 STATS, today=TODAY)[0]
    assert got.queries == 1
    assert got.keys == len(MATCH_RULES["tin+dob+variants"].match_keys(PERSON, today=TODAY))


def test_bad_statistics_are_refused() -> None:
    with pytest.raises(ValueError, match="custodian_share"):
        PopulationStats(custodian_records=10, custodian_share=0.0)
    with pytest.raises(ValueError, match="positive"):
        PopulationStats(custodian_records=10, persons_per_zip=0)


def test_estimate_is_within_2x_of_measured_false_matches(tmp_path: Path) -> None:
    """The validation the accuracy report makes at 100k x 100k, at a size a test affords:
    every rule with >= 20 measured false matches is estimated within a factor of 2."""
    spec = dataclasses.replace(scenario.ScenarioSpec().realistic().scaled(30_000, 30_000),
                               seed=7)
    scenario.generate(spec, tmp_path)
    rows = accuracy.measure_scenario(tmp_path, ["first+last+address", "names_phonetic+dob",
                                                "tin+dob+variants"],
                                       rule_sets=False).rules
    checked = 0
    for row in rows:
        assert row.estimated_false_matches is not None
        if row.false_matches >= 20:
            checked += 1
            assert 0.5 <= row.estimated_false_matches / row.false_matches <= 2.0, row
    assert checked >= 1  # the weak address rule misidentifies Jr/Sr namesakes
    assert {r.rule_id: r for r in rows}["tin+dob+variants"].false_matches == 0


def test_estimate_cli_prints_expected_false_matches(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    header = "record_id,tin,first_name,last_name,dob,address,city,state,zip,tax_periods," \
             "statute,reason"
    row = "Q1,123-45-6789,Mary,Smith,1980-03-04,12 Main Street,Springfield,IL,62701,2023," \
          "26 USC 6103(i),case 1"
    queries = tmp_path / "q.csv"
    queries.write_text(f"{header}\n{row}\n", encoding="utf-8")
    rc = authority_main(["estimate", "--queries", str(queries), "--rules",
                         "tin+dob,first+last+address", "--custodian-records", "1000000"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "1 of 1 query records" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert float(lines["tin+dob"].split()[1]) == 0.0
    assert float(lines["first+last+address"].split()[1].replace(",", "")) > 0.0  # Jr/Sr
    rc = authority_main(["estimate", "--queries", str(queries), "--rules", "nope"])
    assert rc == 2 and "unknown match rule(s) nope" in capsys.readouterr().err


# --------------------------------------------------------------------------- corroborated


def _every_choice(records: Sequence[PersonRecord], rule_ids: Sequence[str], k: int,
                  stats: PopulationStats,
                  keys: Mapping[str, Sequence[Sequence[bytes]]] | None = None) -> float:
    """The corroborated estimate by its definition, one choice of keys at a time: every
    independent group, every choice of one key per rule whose shared fields agree, priced
    on the union of the group's fields (the first implementation, kept as the oracle)."""
    if keys is None:
        keys = query_match_keys_bulk(records, rule_ids, today=TODAY)
    total = 0.0
    for q, record in enumerate(records):
        own_tin = normalize_tin(record.tin)
        parsed: dict[str, list[dict[str, tuple[str, ...]]]] = {}
        for rule_id in rule_ids:
            fields = MATCH_RULES[rule_id].fields
            start = len(encode_match_key(rule_id, ()))
            parsed[rule_id] = []
            for key in keys[rule_id][q]:
                comps, at, values = E._components(key, start), 0, {}
                for f in fields:
                    values[f] = comps[at:at + len(RULE_FIELDS[f])]
                    at += len(RULE_FIELDS[f])
                parsed[rule_id].append(values)
        for group in combinations(rule_ids, k):
            if not independent_group(group):
                continue
            for choice in product(*(parsed[r] for r in group)):
                union: dict[str, tuple[str, ...]] = {}
                if any(union.setdefault(f, v) != v for values in choice
                       for f, v in values.items()):
                    continue
                p = float(stats.custodian_records)
                for f, v in union.items():
                    if E._IMPLIED_BY.get(f) not in union:
                        p *= E._agreement(f, v, own_tin, stats)
                total += p + E._namesake(list(union), stats)
    return total


#: Rule sets whose corroborated groups share fields (tin, dob, zip, names) and mix weak,
#: variant and address rules, so that every part of the pricing is exercised.
CORROBORATED_SETS = [
    (DEFAULT_RULES, 2),
    (("first+last+address", "tin+dob+variants", "last_phonetic+dob+zip",
      "first_phonetic+dob+zip", "tin+zip"), 2),
    (("first+last+address", "tin+dob+variants", "last_phonetic+dob+zip",
      "first_phonetic+dob+zip", "tin+zip"), 3),
    (("names_phonetic+dob", "first+last+address", "tin+last_phonetic+zip"), 2),
]


@pytest.mark.parametrize("rules, k", CORROBORATED_SETS)
def test_corroborated_estimate_equals_pricing_every_choice_of_keys(
        realistic_queries: list[PersonRecord], rules: tuple[str, ...], k: int) -> None:
    """The grouped sums price exactly what enumerating every choice of keys prices, on
    a generated scenario with the realistic error model (variants, typos, namesakes)."""
    people = realistic_queries
    stats = PopulationStats(custodian_records=2_000)
    fast = estimate_corroborated_false_matches(people, rules, k, stats, today=TODAY)
    assert fast == pytest.approx(_every_choice(people, rules, k, stats), rel=1e-9, abs=0)
    assert fast > 0.0
    per_query = corroborated_false_matches_per_query(people, rules, k, stats, today=TODAY)
    assert len(per_query) == len(people) and sum(per_query) == pytest.approx(fast)
    # keys passed in are the keys it would compute
    keys = query_match_keys_bulk(people, rules, today=TODAY)
    assert estimate_corroborated_false_matches(people, rules, k, stats, today=TODAY,
                                               keys=keys) == fast


@pytest.fixture(scope="module")
def realistic_queries(tmp_path_factory: pytest.TempPathFactory) -> list[PersonRecord]:
    out = tmp_path_factory.mktemp("corroborated")
    spec = dataclasses.replace(scenario.ScenarioSpec().realistic().scaled(150, 150), seed=11)
    scenario.generate(spec, out)
    with (out / "queries.csv").open(encoding="utf-8") as fh:
        return [q.person for q in read_query_csv(fh)]


# ------------------------------------------------------------- fast paths against definitions
#
# The estimate builds keys field by field (``key_rows_bulk``: variants expanded once per
# distinct value, rows of components instead of dicts) and prices them batch by batch with
# per-value memos.  These oracles are the straightforward definitions it replaced: every
# key built from its record alone, dicts of components, each key parsed back and priced
# field by field, in file order.  The results must be equal to the last bit.

#: Records that exercise every variant and every way a component goes missing: TIN
#: transpositions (some landing on an invalid TIN), day/month swaps, day and decade typos
#: (a 29 February), a future date, names exchanged, nicknames, compound surnames and
#: suffixes, ZIP+4 and transposable ZIPs, blanks and placeholder values.
VARIED = [
    PERSON,
    replace(PERSON, record_id="v1", tin="100-45-6789", dob="02/29/1984", first_name="Bill",
            last_name="Garcia-Lopez"),
    replace(PERSON, record_id="v2", tin="912-70-1234", first_name="Smith", last_name="Mary",
            dob="1975-11-12", zip="62701-1234"),
    replace(PERSON, record_id="v3", tin="", dob="1990-12-31", first_name="Jim",
            last_name="de la Cruz Jr."),
    replace(PERSON, record_id="v4", tin="666-12-3456", dob="2025-06-20", zip="00000"),
    replace(PERSON, record_id="v5", tin="123-00-6789", first_name="", last_name="O'Brien Sr",
            dob="1960-01-01", zip="12345"),
    replace(PERSON, record_id="v6", tin="001-01-0001", dob="", first_name="Liz",
            last_name="Smith", address="unknown", zip="n/a"),
    replace(PERSON, record_id="v7", tin="098-76-5432", dob="1900-01-02", first_name="Abe",
            last_name="Van Der Berg-Smith", address="PO Box 12", zip="2070"),
    replace(PERSON, record_id="v8", tin="123456789", dob="19800304", first_name="N/A",
            last_name="Unknown", zip="62710"),
    replace(PERSON, record_id="v9", tin="999-99-9999", dob="13/13/1980", first_name="Mary Ann",
            last_name="Smith", zip="62701"),
]


def _variant_parts_oracle(variant: Variant, record: PersonRecord, today: date
                          ) -> list[dict[str, bytes]]:
    """Each variant's replacement components for one record, computed from it alone."""
    enc = R._component
    if variant is Variant.TIN_TRANSPOSITION:
        tin = normalize_tin(record.tin)
        return [{"tin": R._TIN_PREFIX + t.encode("ascii")}
                for t in (V.tin_transpositions(tin) if tin else ()) if normalize_tin(t)]
    if variant in (Variant.DOB_SWAP, Variant.DOB_TYPO):
        parsed = R._parse_dob(record.dob)[0]
        if parsed is None or parsed > today:
            return []
        near = V.dob_swaps(parsed) if variant is Variant.DOB_SWAP else V.dob_typos(parsed)
        return [{"dob": R._DOB_PREFIX + d.isoformat().encode("ascii")}
                for d in near if d <= today]
    if variant is Variant.ZIP_TRANSPOSITION:
        zip5 = normalize_zip(record.zip)
        return [{"zip": cast(bytes, enc(z))}
                for z in (V.tin_transpositions(zip5) if zip5 else ()) if normalize_zip(z)]
    if variant is Variant.NAME_ORDER:
        first, last = (R._first_phonetic_part(record.last_name),
                       R._last_phonetic_part(record.first_name))
        return [] if first is None or last is None else [{"first_phonetic": first,
                                                           "last_phonetic": last}]
    if variant is Variant.SURNAME_PART:
        codes = [V.phonetic(p) for p in V.surname_parts(split_suffix(record.last_name)[0])]
        return [{"last_phonetic": cast(bytes, enc(c))} for c in codes if c]
    codes = [V.phonetic(V.first_name_canonical(n))
             for n in V.first_name_alternatives(normalize_name(record.first_name))]
    return [{"first_phonetic": cast(bytes, enc(c))} for c in codes if c]


def _keys_oracle(rule_id: str, record: PersonRecord) -> list[bytes]:
    """A record's keys by definition: the canonical key, then each variant's, joined and
    deduplicated, leaving out keys that miss a component."""
    rule = MATCH_RULES[rule_id]
    canonical = {f: R._FIELD_COLUMNS[f](lambda name: (getattr(record, name),), TODAY)[0]
                 for f in rule.fields}
    out: dict[bytes, None] = {}
    replacements: list[dict[str, bytes]] = [{}]
    for v in sorted(rule.variants):
        replacements += _variant_parts_oracle(v, record, TODAY)
    for replaced in replacements:
        parts = [replaced.get(f, canonical[f]) for f in rule.fields]
        if all(p is not None for p in parts):
            out.setdefault(encode_match_key(rule_id, ()) + b"".join(cast(list[bytes], parts)))
    return list(out)


def _priced_oracle(records: Sequence[PersonRecord], rule_id: str, stats: PopulationStats,
                   keys: Sequence[Sequence[bytes]]) -> tuple[float, int, int]:
    """(expected false matches, subjects, keys) of one rule: every key parsed back and
    priced field by field, in file order."""
    fields = MATCH_RULES[rule_id].fields
    start = len(encode_match_key(rule_id, ()))
    expected, queries, count = 0.0, 0, 0
    for record, record_keys in zip(records, keys, strict=True):
        if not record_keys:
            continue
        queries, count = queries + 1, count + len(record_keys)
        expected += E._namesake(fields, stats)
        for key in record_keys:
            comps, at, p = E._components(key, start), 0, float(stats.custodian_records)
            for f in fields:
                width = len(RULE_FIELDS[f])
                p *= E._agreement(f, comps[at:at + width], normalize_tin(record.tin), stats)
                at += width
                if p == 0.0:
                    break  # nobody else: the other fields need no statistic
            expected += p
    return expected, queries, count


@pytest.fixture(scope="module")
def varied_queries(realistic_queries: list[PersonRecord]) -> list[PersonRecord]:
    """The edge cases and a generated scenario with the realistic error model."""
    return VARIED + realistic_queries


def test_keys_built_field_by_field_are_the_keys_by_definition(
        varied_queries: list[PersonRecord]) -> None:
    people, rules = varied_queries, list(MATCH_RULES)
    oracle = {r: [_keys_oracle(r, p) for p in people] for r in rules}
    assert any(len(k) > 1 for r in rules for k in oracle[r])  # variants present
    assert any(not k for r in rules for k in oracle[r])  # and subjects without a key
    assert query_match_keys_bulk(people, rules, today=TODAY) == oracle
    rows = key_rows_bulk(people, rules, today=TODAY)
    for r in rules:
        rule = MATCH_RULES[r]
        prefix = encode_match_key(r, ())
        assert [[prefix + b"".join(row) for row in per] for per in rows[r]] == oracle[r]
        for person, keys in zip(people, oracle[r], strict=True):
            assert rule.match_keys(person, today=TODAY) == keys
            assert [prefix + b"".join(c[f] for f in rule.fields)
                    for c in key_components(rule, person, today=TODAY)] == keys


@pytest.mark.parametrize("stats", [STATS, PopulationStats(custodian_records=2_000),
                                   PopulationStats(custodian_records=0)])
def test_batched_estimate_equals_pricing_every_key_by_definition(
        varied_queries: list[PersonRecord], stats: PopulationStats,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(E, "_BATCH", 7)  # many batches, one straddling the edge cases
    people, rules = varied_queries, list(MATCH_RULES)
    keys = query_match_keys_bulk(people, rules, today=TODAY)
    oracle = [(r, *_priced_oracle(people, r, stats, keys[r])) for r in rules]
    assert any(expected > 0.0 for _, expected, _, _ in oracle) or not stats.custodian_records

    def flat(got: list[E.RuleEstimate]) -> list[tuple[str, float, int, int]]:
        return [(e.rule_id, e.expected_false_matches, e.queries, e.keys) for e in got]

    assert flat(estimate_false_matches(people, rules, stats, today=TODAY)) == oracle
    assert flat(estimate_false_matches(people, rules, stats, today=TODAY, keys=keys)) == oracle
    # keys that are not the records' own are priced as given (split, not rebuilt)
    shifted = {r: [*keys[r][1:], keys[r][0]] for r in rules}
    assert flat(estimate_false_matches(people, rules, stats, today=TODAY, keys=shifted)) == [
        (r, *_priced_oracle(people, r, stats, shifted[r])) for r in rules]


@pytest.mark.parametrize("rules, k", CORROBORATED_SETS)
def test_corroborated_estimate_on_edge_cases_and_keys_passed_in(
        varied_queries: list[PersonRecord], rules: tuple[str, ...], k: int) -> None:
    """The edge cases priced per choice of keys; keys passed in are what is priced, also
    when they are not the records' own (split, not rebuilt); the records' own keys passed
    in change nothing."""
    stats = PopulationStats(custodian_records=2_000)
    assert estimate_corroborated_false_matches(VARIED, rules, k, stats, today=TODAY) == \
        pytest.approx(_every_choice(VARIED, rules, k, stats), rel=1e-9, abs=0)
    mine = query_match_keys_bulk(VARIED, rules, today=TODAY)
    others = {r: mine[r][::-1] for r in rules}
    assert estimate_corroborated_false_matches(VARIED, rules, k, stats, today=TODAY,
                                               keys=others) == \
        pytest.approx(_every_choice(VARIED, rules, k, stats, keys=others), rel=1e-9, abs=0)
    own = query_match_keys_bulk(varied_queries, rules, today=TODAY)
    assert corroborated_false_matches_per_query(varied_queries, rules, k, stats, today=TODAY,
                                                keys=own) == \
        corroborated_false_matches_per_query(varied_queries, rules, k, stats, today=TODAY)
