"""Compact custodian record storage: same records, same refusals, far less memory."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import date

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.crypto.kkrt import digest_bytes
from protocol.domain.records import (
    MATCH_RULES,
    PersonRecord,
    match_keys_bulk,
    validate_persons,
    write_person_csv,
)
from protocol.domain.recordstore import (
    KEY_JOB_RECORDS,
    CompactRecords,
    _blob_match_keys,
    _pack_job,
    bulk_keyed_records,
    bulk_match_keys,
    bulk_match_keys_digested,
    ids_and_fields,
    load_custodian_csv,
)
from tests.factories import make_person

TODAY = date(2025, 6, 15)  # the clock is injected, never read
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x1f"),
               max_size=12)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(text, text, text, text), max_size=20))
def test_round_trip(values) -> None:
    records = [
        PersonRecord(f"r{i}", "123-45-6789", a, b, "1980-01-01", c, "X", "IL", "62701",
                     record_class=d, extra=(("tax_paid_cents", str(i)),))
        for i, (a, b, c, d) in enumerate(values)
    ]
    store = CompactRecords.of(records)
    assert list(store) == records
    assert [store[i] for i in range(len(store))] == records
    assert store.record_classes() == [r.record_class for r in records]
    assert store.record_ids() == [r.record_id for r in records]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(text, text, text), min_size=1, max_size=20),
       st.lists(st.sampled_from(["first_name", "dob", "record_class", "tax_paid_cents",
                                 "zip", "city", "note"]), max_size=7),
       st.data())
def test_ids_and_fields_from_packed_records_are_the_records_own(values, names, data) -> None:
    """A disclosure reads ids and granted fields straight from the packed blobs; they must
    be what each record's ``get`` gives, extras (even one named like a person field, which
    ``get`` never reaches) and the record class included."""
    records = [
        PersonRecord(f"r{i}", "123-45-6789", a, "Doe", "1980-01-01", "1 Main St", b, "IL",
                     "62701", record_class=c,
                     extra=(("tax_paid_cents", str(i)), ("city", "shadow"), ("note", a)))
        for i, (a, b, c) in enumerate(values)
    ]
    positions = data.draw(st.lists(st.integers(0, len(records) - 1), max_size=30))
    want = [(records[p].record_id, tuple((f, records[p].get(f)) for f in names))
            for p in positions]
    assert ids_and_fields(CompactRecords.of(records), positions, names) == want
    assert ids_and_fields(records, positions, names) == want


def test_ids_and_fields_refuse_a_field_no_record_has() -> None:
    store = CompactRecords.of([make_person(1), make_person(2)])
    with pytest.raises(KeyError, match="shoe_size"):
        ids_and_fields(store, [1], ["first_name", "shoe_size"])


def _csv(records) -> io.StringIO:
    buf = io.StringIO()
    write_person_csv(records, buf)
    buf.seek(0)
    return buf


def test_loader_refuses_like_validate_persons() -> None:
    people = [make_person(i) for i in range(30)]
    people[3] = replace(people[3], tin="000-00-0000")  # malformed TIN
    people[7] = replace(people[7], dob="2023-02-30")  # impossible date
    people[12] = replace(people[12], record_id=people[11].record_id)  # duplicate id
    people.append(replace(make_person(40), record_id=people[20].record_id))  # another duplicate
    store, refused, rows = load_custodian_csv(_csv(people), today=TODAY)
    expected_kept, expected_refused = validate_persons(enumerate(people, 2), today=TODAY)
    assert rows == len(people)
    assert list(store) == expected_kept
    assert {(r.record_id, r.code) for r in refused} == {
        (r.record_id, r.code) for r in expected_refused}


def test_query_loader_matches_validate_queries() -> None:
    from protocol.domain.records import validate_queries, write_query_csv
    from tests.factories import as_query

    queries = [as_query(make_person(i)) for i in range(20)]
    queries[2] = as_query(replace(make_person(2), address="Failed to Provide"))
    queries[5] = as_query(replace(make_person(5), address="20500"))
    queries[9] = replace(queries[9], metadata=replace(queries[9].metadata, statute=""))
    queries[14] = as_query(make_person(13))  # duplicate id q-c13
    buf = io.StringIO()
    write_query_csv(queries, buf)
    buf.seek(0)
    from protocol.domain.recordstore import load_query_csv

    store, refused, rows = load_query_csv(buf, today=TODAY)
    report = validate_queries(enumerate(queries, 2), today=TODAY)
    assert rows == 20
    assert list(store) == [q.person for q in report.accepted]
    assert {(r.record_id, r.code) for r in refused} == {
        (r.record_id, r.code) for r in report.refused}


def _varied_people(n: int) -> list[PersonRecord]:
    """Records that exercise every rule: suffixes, dashed TINs, unit designators, bad parts."""
    people = []
    for i in range(n):
        p = make_person(i)
        if i % 5 == 0:
            p = replace(p, last_name=p.last_name + " Jr.", tin=f"{p.tin[:3]}-{p.tin[3:5]}-"
                        f"{p.tin[5:]}")
        if i % 7 == 0:
            p = replace(p, address=p.address + " Apt 4", zip=p.zip + "-0001")
        if i % 11 == 0:
            p = replace(p, dob="not a date")  # no key under the dob rules
        if i % 13 == 0:
            p = replace(p, first_name="Zoë", city="Saint-Étienne")
        people.append(p)
    return people


def test_bulk_match_keys_from_packed_storage_equals_the_record_path() -> None:
    """Keys cut straight from packed blobs, serially or on worker processes, in any
    selection, are exactly the keys of the records themselves."""
    from concurrent.futures import ProcessPoolExecutor

    people = _varied_people(2 * KEY_JOB_RECORDS + 123)
    store = CompactRecords.of(people)
    rules = list(MATCH_RULES)
    want = match_keys_bulk(people, rules, today=TODAY)
    assert sum(k is None for k in want["tin+dob"]) > 0  # the bad dates really drop out
    assert bulk_match_keys(store, rules, today=TODAY) == want
    assert bulk_match_keys(people, rules, today=TODAY) == want
    positions = list(range(len(people) - 1, -1, -3))
    picked = match_keys_bulk([people[i] for i in positions], rules, today=TODAY)
    assert bulk_match_keys(store, rules, positions=positions, today=TODAY) == picked
    assert bulk_match_keys(people, rules, positions=positions, today=TODAY) == picked
    with ProcessPoolExecutor(max_workers=2) as pool:
        assert bulk_match_keys(store, rules, executor=pool, today=TODAY) == want
        # the KKRT requester's keys and their digests, from the same worker jobs
        for source in (store, people):
            keys, digests = bulk_match_keys_digested(source, rules, digest_bytes,
                                                     executor=pool, today=TODAY)
            assert keys == want
            assert digests == {r: digest_bytes([k for k in want[r] if k is not None])
                               for r in rules}
        assert bulk_match_keys(store, ["tin+dob"], positions=positions,
                               executor=pool, today=TODAY) == {"tin+dob": picked["tin+dob"]}
        # a requester's ids, keys and digests in one pass over its packed queries
        ids = [p.record_id for p in people]
        for source in (store, people):
            for executor in (pool, None):
                got = bulk_keyed_records(source, rules, digest_bytes, executor=executor,
                                         today=TODAY)
                assert got.record_ids == ids == store.record_ids()
                assert got.keys == want
                assert got.digests == digests
        assert bulk_keyed_records(store, rules, executor=pool, today=TODAY).digests == {}


def test_packed_records_of_another_width_are_refused_not_misread() -> None:
    """Columns are cut from one split of a whole job, which is only right when every blob
    has the same fields; a job mixing widths is an error, not a shifted column."""
    wide = CompactRecords.of([replace(make_person(1), extra=(("alias", "x"),))])
    narrow = CompactRecords.of([make_person(2)])
    with pytest.raises(ValueError, match="different widths"):
        _blob_match_keys(_pack_job(narrow.blobs() + narrow.blobs() + wide.blobs()),
                         ("tin+dob",), TODAY)
