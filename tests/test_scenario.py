"""The synthetic benchmark scenario and the per-rule accuracy measured on it."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import accuracy
from protocol.adapters import scenario
from protocol.adapters.files import open_csv
from protocol.adapters.scenario import PLACEHOLDER_ADDRESSES, ScenarioSpec, generate
from protocol.domain import records

SMALL = ScenarioSpec().scaled(4_000, 4_000)
DEMO = ScenarioSpec().scaled(20_000, 20_000)
TODAY = date(2025, 6, 15)  # after the generator's reference date; the clock is injected


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> scenario.ScenarioFiles:
    return generate(SMALL, tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> scenario.ScenarioFiles:
    return generate(DEMO, tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def demo_accuracy(demo: scenario.ScenarioFiles) -> dict[str, accuracy.RuleAccuracy]:
    return {r.rule_id: r for r in accuracy.measure(demo.custodian.parent)}


# --------------------------------------------------------------------------- spec


def test_default_spec_is_the_headline_scenario() -> None:
    spec = ScenarioSpec()
    assert (spec.queries, spec.records, spec.true_matches) == (1_280_000, 1_300_000, 47_289)
    assert spec.scaled(spec.queries, spec.records) == spec


def test_scaled_keeps_rates_and_match_share() -> None:
    spec = ScenarioSpec(placeholder_rate=0.05)
    small = spec.scaled(20_000, 20_000)
    assert small.true_matches == round(47_289 * 20_000 / 1_280_000)
    assert small.placeholder_rate == 0.05
    assert small.seed == spec.seed
    assert spec.scaled(3, 3).true_matches == 1  # never scaled to nothing
    assert spec.scaled(100_000, 10).true_matches == 10  # never more than the records


@pytest.mark.parametrize(
    "change",
    [{"queries": 0}, {"true_matches": 5_000_000}, {"moved_rate": 1.5},
     {"placeholder_rate": 0.7, "zip_only_rate": 0.7}, {"persons_per_zip": 0}],
)
def test_spec_rejects_impossible_values(change: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(ScenarioSpec(), **change)


# --------------------------------------------------------------------------- generation


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    spec = ScenarioSpec().scaled(1_500, 1_500)
    a = generate(spec, tmp_path / "a")
    b = generate(spec, tmp_path / "b")
    c = generate(dataclasses.replace(spec, seed=spec.seed + 1), tmp_path / "c")
    for name in ("custodian", "queries", "truth"):
        assert getattr(a, name).read_bytes() == getattr(b, name).read_bytes()
    assert a.queries.read_bytes() != c.queries.read_bytes()
    assert a.custodian.read_bytes() != c.custodian.read_bytes()


def test_manifest_records_spec_counts_and_hashes(small: scenario.ScenarioFiles) -> None:
    import hashlib

    manifest = json.loads(small.manifest.read_text())
    assert manifest["spec"] == dataclasses.asdict(SMALL)
    assert manifest["counts"]["true_matches"] == SMALL.true_matches
    assert manifest["counts"]["jr_sr_pairs"] > 0
    for name in ("custodian", "queries", "truth"):
        path = getattr(small, name)
        assert manifest["files"][name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_row_counts_and_exact_number_of_true_matches(small: scenario.ScenarioFiles) -> None:
    custodian, queries, truth = (_rows(p) for p in (small.custodian, small.queries, small.truth))
    assert len(custodian) == SMALL.records
    assert len(queries) == SMALL.queries
    assert len(truth) == SMALL.true_matches
    query_ids = {q["record_id"] for q in queries}
    record_ids = {c["record_id"] for c in custodian}
    assert len(query_ids) == len(queries) and len(record_ids) == len(custodian)
    assert {t["query_record_id"] for t in truth} <= query_ids
    assert {t["custodian_record_id"] for t in truth} <= record_ids
    # One custodian person per true query and vice versa.
    assert len({t["query_record_id"] for t in truth}) == len(truth)
    assert len({t["custodian_record_id"] for t in truth}) == len(truth)


def test_headers_are_the_documented_ones(small: scenario.ScenarioFiles) -> None:
    def header(path: Path) -> list[str]:
        return path.read_text().splitlines()[0].split(",")

    assert header(small.custodian) == [
        "record_id", "tin", "first_name", "last_name", "dob", "address", "city", "state",
        "zip", "record_class", "tax_paid_cents",
    ]
    assert header(small.queries) == [
        "record_id", "tin", "first_name", "last_name", "dob", "address", "city", "state",
        "zip", "tax_periods", "statute", "reason",
    ]
    assert header(small.truth) == ["query_record_id", "custodian_record_id"]


def test_truth_pairs_are_the_same_person(small: scenario.ScenarioFiles) -> None:
    queries = {q["record_id"]: q for q in _rows(small.queries)}
    custodian = {c["record_id"]: c for c in _rows(small.custodian)}
    same_tin = with_tin = same_dob = same_name = 0
    for pair in _rows(small.truth):
        q, c = queries[pair["query_record_id"]], custodian[pair["custodian_record_id"]]
        if q["tin"]:
            with_tin += 1
            same_tin += records.normalize_tin(q["tin"]) == c["tin"]
        same_dob += (records.normalize_dob(q["dob"], today=TODAY)
                     == records.normalize_dob(c["dob"], today=TODAY))
        same_name += (records.normalize_name(q["first_name"])
                      == records.normalize_name(c["first_name"]))
    n = SMALL.true_matches
    # Only the rare TIN, DOB and name typos separate a true pair.
    assert with_tin >= 0.9 * n
    assert same_tin >= with_tin - max(3, 0.01 * with_tin)
    assert same_dob >= 0.97 * n
    assert same_name >= 0.95 * n


def test_truth_pairs_share_the_tin_exactly_without_tin_typos(tmp_path: Path) -> None:
    spec = dataclasses.replace(ScenarioSpec().scaled(2_000, 2_000), tin_typo_rate=0.0)
    files = generate(spec, tmp_path)
    queries = {q["record_id"]: q for q in _rows(files.queries)}
    custodian = {c["record_id"]: c for c in _rows(files.custodian)}
    checked = 0
    for pair in _rows(files.truth):
        q, c = queries[pair["query_record_id"]], custodian[pair["custodian_record_id"]]
        if q["tin"]:
            assert records.normalize_tin(q["tin"]) == c["tin"]
            checked += 1
    assert checked > 0


def test_custodian_tins_are_unique_and_well_formed(demo: scenario.ScenarioFiles) -> None:
    tins = [c["tin"] for c in _rows(demo.custodian)]
    assert len(set(tins)) == len(tins)
    itin = 0
    for tin in tins:
        assert records.normalize_tin(tin) == tin
        area, group = int(tin[:3]), int(tin[3:5])
        if area >= 900:
            itin += 1
            assert 70 <= group <= 88
        else:
            assert area not in (0, 666) and group != 0 and tin[5:] != "0000"
    assert 0.02 * len(tins) < itin < 0.06 * len(tins)


def test_noise_rates_are_near_the_spec(demo: scenario.ScenarioFiles) -> None:
    queries = _rows(demo.queries)
    n = len(queries)
    placeholder = sum(q["address"] in PLACEHOLDER_ADDRESSES for q in queries) / n
    zip_only = sum(q["address"].endswith(q["zip"]) and bool(q["zip"]) for q in queries) / n
    no_tin = sum(not q["tin"] for q in queries) / n
    us_dob = sum("/" in q["dob"] for q in queries) / n
    # Binomial at n = 20,000: these windows are more than 5 standard deviations wide.
    assert abs(placeholder - DEMO.placeholder_rate) < 0.006
    assert abs(zip_only - DEMO.zip_only_rate) < 0.004
    assert abs(no_tin - DEMO.missing_tin_rate) < 0.008
    assert abs(us_dob - DEMO.dob_format_rate) < 0.012
    assert all(records.normalize_dob(q["dob"], today=TODAY) is not None for q in queries)


def test_validation_refuses_placeholders_and_zip_only(small: scenario.ScenarioFiles) -> None:
    with open_csv(small.queries) as fh:
        rows = records.read_query_csv_with_lines(fh)
    report = records.validate_queries(rows, today=TODAY)
    counts = report.counts_by_reason()
    by_address = Counter(
        q.person.address for _, q in rows if q.person.address in PLACEHOLDER_ADDRESSES
    )
    assert counts["placeholder_address"] == sum(by_address.values())
    assert set(by_address) == set(PLACEHOLDER_ADDRESSES)
    manifest = json.loads(small.manifest.read_text())
    assert counts["zip_only_address"] == manifest["counts"]["zip_only_addresses"]
    assert 0.9 * SMALL.queries < len(report.accepted) < SMALL.queries


def test_load_keeps_only_what_validation_accepts(small: scenario.ScenarioFiles) -> None:
    records_in, queries_in = small.load(today=TODAY)
    with open_csv(small.queries) as fh:
        report = records.validate_queries(records.read_query_csv_with_lines(fh), today=TODAY)
    assert [p.record_id for p in queries_in] == [q.person.record_id for q in report.accepted]
    with open_csv(small.custodian) as fh:
        usable, _refused = records.validate_persons(records.read_person_csv_with_lines(fh),
                                                    today=TODAY)
    assert [p.record_id for p in records_in] == [p.record_id for p in usable]


def test_population_has_households_and_common_names(demo: scenario.ScenarioFiles) -> None:
    custodian = _rows(demo.custodian)
    addresses = Counter((c["address"], c["zip"]) for c in custodian)
    shared = [a for a, k in addresses.items() if k >= 2]
    assert len(shared) > 0.05 * len(addresses)  # many filers share a home
    surnames = Counter(records.split_suffix(c["last_name"])[0] for c in custodian)
    # US frequencies from faker: Smith is the most common surname by a wide margin.
    assert surnames.most_common(1)[0][0] == "smith"
    assert surnames["smith"] > 0.012 * len(custodian)
    # Jr/Sr pairs: same first and last name at one address, recorded suffix or not.
    people = Counter(
        (records.normalize_name(c["first_name"]), records.split_suffix(c["last_name"])[0],
         c["address"], c["zip"])
        for c in custodian
    )
    assert any(k >= 2 for k in people.values())
    assert any(records.split_suffix(c["last_name"])[1] == "jr" for c in custodian)
    protected = sum(c["record_class"] == "protected" for c in custodian)
    assert 0 < protected < 0.005 * len(custodian)
    assert all(c["record_class"] in ("", "protected") for c in custodian)
    assert all(int(c["tax_paid_cents"]) >= 0 for c in custodian)


def test_files_round_trip_through_protocol_records(tmp_path: Path) -> None:
    # Enough protected records that write_person_csv emits the record_class column too.
    spec = dataclasses.replace(ScenarioSpec().scaled(1_000, 1_000), protected_rate=0.05)
    files = generate(spec, tmp_path)
    buf = io.StringIO(newline="")
    with open_csv(files.queries) as fh:
        records.write_query_csv(records.read_query_csv(fh), buf)
    assert buf.getvalue().encode() == files.queries.read_bytes()
    with open_csv(files.custodian) as fh:
        persons = records.read_person_csv(fh)
    assert persons[0].get("tax_paid_cents").isdigit()
    buf = io.StringIO(newline="")
    records.write_person_csv(persons, buf)
    assert buf.getvalue().encode() == files.custodian.read_bytes()


# --------------------------------------------------------------------------- helpers


@settings(max_examples=60, deadline=None)
@given(st.lists(
    st.lists(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=12)
             | st.sampled_from(["a,b", 'say "hi"', "x\ny", ""]),
             min_size=3, max_size=3),
    min_size=1, max_size=8,
))
def test_csv_writer_matches_the_csv_module(rows: list[list[str]]) -> None:
    columns = list(zip(*rows, strict=True))
    fields = []
    for col in columns:
        raw = np.array([v.encode() for v in col], dtype=bytes)
        if raw.dtype.itemsize == 0:
            raw = raw.astype("S1")
        fields.append(raw.view(np.uint8).reshape(len(col), raw.dtype.itemsize))
    out = io.BytesIO()
    scenario._write_csv(out, ("a", "b", "c"), fields, chunk=3)
    expected = io.StringIO(newline="")
    writer = csv.writer(expected, lineterminator="\r\n")
    writer.writerow(["a", "b", "c"])
    writer.writerows(rows)
    assert out.getvalue() == expected.getvalue().encode()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=99_999), min_size=1, max_size=20))
def test_digits_renders_integers(values: list[int]) -> None:
    arr = np.array(values)
    padded = scenario._digits(arr, 5)
    trimmed = scenario._digits(arr, 5, zero_pad=False)
    for v, p, t in zip(values, padded, trimmed, strict=True):
        assert bytes(p).decode() == f"{v:05d}"
        assert bytes(t[t != 0]).decode() == str(v)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["Al", "Ann", "Anna", "Smith", "Williams", "Christopher"]),
                min_size=1, max_size=30),
       st.integers(min_value=0, max_value=2**32 - 1))
def test_typos_change_one_letter_but_not_the_first(names: list[str], seed: int) -> None:
    raw = np.array([n.encode() for n in names], dtype="S13")
    mat = raw.view(np.uint8).reshape(len(names), 13)
    out = scenario._typos(np.random.default_rng(seed), mat)
    for before, row in zip(names, out, strict=True):
        after = bytes(row[row != 0]).decode()
        assert after != before
        assert after[0] == before[0]
        assert abs(len(after) - len(before)) <= 1


def test_dob_typos_stay_real_dates_and_differ() -> None:
    rng = np.random.default_rng(7)
    dob = np.datetime64("1950-01-01") + rng.integers(0, 20_000, 500).astype("timedelta64[D]")
    wrong = scenario._dob_typos(rng, dob)
    assert (wrong != dob).all()
    text = scenario._dob_text(wrong, np.zeros(dob.size, dtype=bool))
    assert all(records.normalize_dob(bytes(t).decode(), today=TODAY) for t in text)


# --------------------------------------------------------------------------- accuracy


def test_strong_rule_is_precise(demo_accuracy: dict[str, accuracy.RuleAccuracy]) -> None:
    tin_dob = demo_accuracy["tin+dob"]
    assert tin_dob.precision >= 0.99
    assert tin_dob.recall > 0.8


def test_name_and_address_misidentifies_more_than_tin_and_dob(
    demo_accuracy: dict[str, accuracy.RuleAccuracy],
) -> None:
    weak, strong = demo_accuracy["first+last+address"], demo_accuracy["tin+dob"]
    assert weak.false_matches > strong.false_matches
    assert weak.misidentification_rate > strong.misidentification_rate
    assert weak.misidentification_rate > 0.02  # relatives and Jr/Sr at the same address


def test_accuracy_counts_are_consistent(demo_accuracy: dict[str, accuracy.RuleAccuracy]) -> None:
    assert set(demo_accuracy) == set(records.MATCH_RULES)
    for r in demo_accuracy.values():
        assert r.queries == DEMO.queries
        assert r.true_matches == DEMO.true_matches
        assert r.evaluated + r.refused == r.queries
        assert 0 < r.refused < 0.1 * r.queries
        assert r.predicted_pairs == r.true_positives + r.false_matches
        assert r.true_positives <= r.true_matches
        assert r.matched_queries <= r.evaluated - r.no_key
        assert r.recall == pytest.approx(r.true_positives / r.true_matches)
        assert r.precision + r.misidentification_rate == pytest.approx(1.0)
    # Queries without a TIN have no key under the TIN rules, and only under those.
    assert demo_accuracy["tin+dob"].no_key > 0.03 * DEMO.queries
    assert demo_accuracy["first+last+address"].no_key == 0


def test_measure_selected_rules_and_rejects_unknown(small: scenario.ScenarioFiles) -> None:
    got = accuracy.measure(small.custodian.parent, ["tin+dob"])
    assert [r.rule_id for r in got] == ["tin+dob"]
    with pytest.raises(ValueError, match="unknown"):
        accuracy.measure(small.custodian.parent, ["shoe-size"])


# --------------------------------------------------------------------------- CLIs


def test_scenario_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    assert scenario.main(["--queries", "300", "--records", "400", "--seed", "5",
                          "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spec"]["seed"] == 5
    assert manifest["counts"]["records"] == 400
    assert manifest["counts"]["true_matches"] == ScenarioSpec().scaled(300, 400).true_matches
    with pytest.raises(SystemExit) as exc:
        scenario.main(["--help"])
    assert exc.value.code == 0


def test_accuracy_cli_writes_json_and_markdown(
    small: scenario.ScenarioFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    js, md = tmp_path / "acc.json", tmp_path / "acc.md"
    code = accuracy.main([str(small.custodian.parent), "--json", str(js), "--markdown", str(md)])
    assert code == 0
    assert "first+last+address" in capsys.readouterr().out
    payload = json.loads(js.read_text())
    assert [r["rule_id"] for r in payload["rules"]] == list(records.MATCH_RULES)
    assert payload["scenario_spec"]["seed"] == SMALL.seed
    table = md.read_text()
    assert table.startswith("# Match-rule accuracy")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    # header + one row per rule + each rule set and each corroborated set
    assert len(rows) == (1 + len(records.MATCH_RULES) + len(accuracy.RULE_SETS)
                         + len(accuracy.CORROBORATED_SETS))
    assert "Estimate validation" in table
    assert accuracy.main([str(tmp_path / "missing")]) == 2


# --------------------------------------------------------------------------- realistic errors


def test_realistic_error_model_writes_each_error_type(tmp_path: Path) -> None:
    """Nicknames, exchanged names, missing dates and compound surnames appear only under
    the realistic model; the baseline draws none of them (its files stay as they were)."""
    extra = ("nicknames", "name_order_swaps", "missing_dob", "compound_surnames")
    base = generate(SMALL, tmp_path / "base")
    counts = json.loads(base.manifest.read_text())["counts"]
    assert all(counts[k] == 0 for k in extra)

    files = generate(SMALL.realistic(), tmp_path / "real")
    counts = json.loads(files.manifest.read_text())["counts"]
    assert all(counts[k] > 0 for k in extra), counts
    assert counts["name_typos"] > json.loads(base.manifest.read_text())["counts"]["name_typos"]
    queries = {r["record_id"]: r for r in _rows(files.queries)}
    custodian = {r["record_id"]: r for r in _rows(files.custodian)}
    truth = _rows(files.truth)
    first_names = set(scenario._names().first_text)
    nicknamed = hyphenated = one_part = 0
    for pair in truth:
        q, c = queries[pair["query_record_id"]], custodian[pair["custodian_record_id"]]
        if q["first_name"].title() not in first_names and q["first_name"] and \
                q["first_name"].title() != c["last_name"].title():
            nicknamed += 1
        if "-" in q["last_name"] or (" " in q["last_name"].strip()
                                     and not q["last_name"].rstrip(". ").endswith(
                                         ("Jr", "JR", "Sr", "SR", "jr", "sr"))):
            hyphenated += 1
            if "-" not in c["last_name"]:
                one_part += 1
    assert nicknamed > 0 and hyphenated > 0 and one_part > 0


def test_realistic_error_model_keeps_the_default_rules_recall(tmp_path: Path) -> None:
    """At 4,000 queries: the default rule set finds >= 95% of the true matches that
    validation lets through, and misidentifies nobody."""
    files = generate(SMALL.realistic(), tmp_path)
    dataset = accuracy.load_scenario(files.custodian.parent, today=TODAY)
    rows = accuracy.measure_dataset(dataset, [], today=TODAY, estimate=False)
    default = next(r for r in rows if r.rule_id.startswith("default:"))
    accepted_truth = sum(p.record_id in dataset.truth for p in dataset.accepted)
    assert default.false_matches == 0
    assert default.true_positives >= 0.95 * accepted_truth
    exact = next(r for r in rows if r.rule_id.startswith("strong exact"))
    assert default.true_positives > exact.true_positives
