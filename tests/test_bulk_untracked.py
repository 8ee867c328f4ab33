"""Long-lived bulk sequences are tuples the cyclic collector untracks (docs/architecture.md,
Long-lived bulk data): its full passes must not walk a million-item list per session."""

from __future__ import annotations

import gc
import pickle
from pathlib import Path

from protocol.domain.recordstore import CompactRecords
from protocol.sessions.identity import RequesterSession, run_in_process
from tests.factories import as_query, make_person, make_world


def _untracked_after_a_pass(obj: object) -> bool:
    gc.collect()
    return not gc.is_tracked(obj)


def test_packed_records_are_sealed_and_untracked() -> None:
    people = [make_person(i) for i in range(50)]
    records = CompactRecords.of(people)
    assert isinstance(records._blobs, tuple)
    assert _untracked_after_a_pass(records._blobs)
    assert list(records) == people


def test_appending_after_seal_reopens_the_store_and_loses_nothing() -> None:
    records = CompactRecords.of([make_person(i) for i in range(3)])
    records.append(make_person(3))
    assert [r.record_id for r in records] == [make_person(i).record_id for i in range(4)]
    assert isinstance(records.seal()._blobs, tuple) and len(records) == 4


def test_unpickled_records_are_sealed_even_from_a_list_pickle() -> None:
    records = CompactRecords()
    for i in range(5):
        records.append(make_person(i))
    assert isinstance(records._blobs, list)  # still being built
    again = pickle.loads(pickle.dumps(records))
    assert isinstance(again._blobs, tuple) and list(again) == list(records)


def test_a_sessions_bulk_sequences_are_untracked(tmp_path: Path) -> None:
    world = make_world(tmp_path, n_records=60, allowed_engines=frozenset({"oprf", "kkrt"}))
    queries = [as_query(world.records[i]) for i in range(20, 50)]
    queries += [as_query(make_person(3000 + i, prefix="u")) for i in range(10)]
    signed = world.authorize(rules=("tin+dob", "first+last+dob+zip"), engines=("kkrt",))
    custodian = world.custodian()
    session = RequesterSession(signed, queries, engine="kkrt",
                               signing_key=world.requester_key)
    bulk = {"query_ids": session.query_ids, "element_query": session.element_query,
            "element_rule": session.element_rule, "element_input": session.element_input}
    assert {name: len(seq) for name, seq in bulk.items()} == {
        "query_ids": 40, "element_query": 80, "element_rule": 80, "element_input": 80}
    gc.collect()
    assert [name for name, seq in bulk.items() if gc.is_tracked(seq)] == []
    outcome = run_in_process(session, custodian.session(), requester_id="agency-a")
    assert len(outcome.results) == 60  # 30 queries x 2 rules; the 10 others match nothing
    keys = custodian.engine("kkrt").keys(("tin+dob", "first+last+dob+zip"))[0]
    assert isinstance(keys, tuple) and len(keys) == 120
    assert _untracked_after_a_pass(keys)
