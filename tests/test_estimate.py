"""The misidentification estimate (docs/architecture.md, Recall and misidentification):
priced from population statistics before matching, and checked against the false matches
measured on a generated scenario."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import replace
from datetime import date
from itertools import combinations, product
from pathlib import Path

import pytest

from benchmarks import accuracy
from protocol.adapters import scenario
from protocol.cli.authority import main as authority_main
from protocol.domain import estimate as E
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
    encode_match_key,
    independent_group,
    normalize_tin,
    query_match_keys_bulk,
    read_query_csv,
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
                  stats: PopulationStats) -> float:
    """The corroborated estimate by its definition, one choice of keys at a time: every
    independent group, every choice of one key per rule whose shared fields agree, priced
    on the union of the group's fields (the first implementation, kept as the oracle)."""
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
