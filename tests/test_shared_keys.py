"""A match key held by several custodian records discloses every holder (docs/architecture.md,
Shared keys).

The plaintext join pairs a query with each record that holds its key; every engine's
``verify`` now returns all of them, so the disclosed (query, record, rule) triples equal the
join's, each holder counts against the cap and gets its own ledger row, and a corroborated
group discloses only the records that all of its keys name.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agency_a.cli import late_summary_lines
from proto import service_kit as kit
from proto.codec import validate
from protocol.crypto import tagset
from protocol.domain.engine import Engine, IndexMode
from protocol.domain.messages import MAX_DISCLOSURE_BATCH, MAX_HOLDERS_PER_KEY
from protocol.domain.records import MATCH_RULES
from protocol.errors import InvalidElementError
from protocol.sessions.identity import RequesterSession, SessionOutcome, run_in_process
from tests.factories import World, as_query, make_world
from tests.test_epoch_engine import EPOCH, MAX_EVALUATIONS, MemoryEpochIndex

RULES = ("tin+dob", "first+last+dob+zip")
FIELDS = ("address", "city", "state", "zip")


def _world(tmp_path: Path, **policy: Any) -> World:
    """Forty people, plus a second return under person 5's TIN and birth date (another name
    and address) and a namesake of person 8 (same names, birth date and ZIP, another TIN)."""
    world = make_world(tmp_path, 40, **policy)
    twin = replace(world.records[5], record_id="c-twin", first_name="Other",
                   last_name="Filer", address="9 Elm Street")
    namesake = replace(world.records[8], record_id="c-namesake", tin="899-98-9999",
                       address="77 Oak Avenue")
    world.records = [*world.records, twin, namesake]
    return world


def _queries(world: World) -> list[Any]:
    return [as_query(world.records[i]) for i in (5, 8, 20)]


def _plaintext_join(world: World, queries: list[Any]) -> set[tuple[str, str, str]]:
    today = dt.date.today()
    pairs = set()
    for rule in RULES:
        holders: dict[bytes, set[str]] = {}
        for r in world.records:
            key = MATCH_RULES[rule].match_key(r, today=today)
            if key is not None:
                holders.setdefault(key, set()).add(r.record_id)
        for q in queries:
            key = MATCH_RULES[rule].match_key(q.person, today=today)
            for record_id in holders.get(key, set()) if key is not None else ():
                pairs.add((q.person.record_id, record_id, rule))
    return pairs


def _run(world: World, engine: str, queries: list[Any], **auth: Any
         ) -> tuple[SessionOutcome, set[tuple[str, str, str]], str]:
    auth.setdefault("max_evaluations", MAX_EVALUATIONS)
    signed = world.authorize(rules=RULES, fields=FIELDS, engines=(engine,), **auth)
    custodian = world.custodian(**({"epoch_index": _index(world)}
                                   if engine == Engine.OPRF_EPOCH else {}))
    session = custodian.session()
    extra = {"tagset": _index(world), "chunk_size": 7} if engine == Engine.OPRF_EPOCH else {}
    requester = RequesterSession(signed, queries, engine=engine,
                                 signing_key=world.requester_key, **extra)
    outcome = run_in_process(requester, session, requester_id="agency-a")
    record_of = {session.pseudonym(r): r.record_id for r in world.records}
    pairs = {(r.query_record_id, record_of[r.pseudonym], r.rule_id) for r in outcome.results}
    return outcome, pairs, signed.authorization.authorization_id


def _index(world: World) -> MemoryEpochIndex:
    return MemoryEpochIndex(world.records, tagset.epoch_key(world.master_secret, EPOCH),
                            rules=RULES)


@pytest.mark.parametrize("engine", [Engine.OPRF, Engine.KKRT, Engine.OPRF_EPOCH])
def test_every_holder_of_a_shared_key_is_disclosed_and_accounted(
        tmp_path: Path, engine: str) -> None:
    policy: dict[str, Any] = {"allowed_engines": frozenset({engine})}
    if engine == Engine.OPRF_EPOCH:
        policy.update(index_mode=IndexMode.EPOCH, epoch_id=EPOCH,
                      epoch_max_evaluations=MAX_EVALUATIONS)
    world = _world(tmp_path, **policy)
    queries = _queries(world)
    outcome, pairs, auth_id = _run(world, engine, queries)
    expected = _plaintext_join(world, queries)
    # the twin return and the namesake are in the join, and now in what was disclosed
    assert ("q-c5", "c-twin", "tin+dob") in expected
    assert ("q-c8", "c-namesake", "first+last+dob+zip") in expected
    assert pairs == expected
    # each holder counts once against the cap and has its own ledger row
    disclosed = {record for _, record, _ in expected}
    assert outcome.receipt.disclosed == len(disclosed) == 5
    assert {row.record_id for row in world.ledger.disclosures(auth_id)} == disclosed
    assert outcome.rejected == 0


def test_a_corroborated_group_discloses_only_the_record_every_key_names(
        tmp_path: Path) -> None:
    world = _world(tmp_path)
    queries = _queries(world)
    outcome, pairs, auth_id = _run(world, Engine.OPRF, queries, corroboration=2)
    # tin+dob names person 5 and the twin, the name rule names person 5 alone: person 5;
    # the name rule names person 8 and the namesake, tin+dob person 8 alone: person 8
    assert {(q, record) for q, record, _ in pairs} == {
        ("q-c5", "c5"), ("q-c8", "c8"), ("q-c20", "c20")}
    assert {row.record_id for row in world.ledger.disclosures(auth_id)} == {"c5", "c8", "c20"}
    assert outcome.rejected == 0


def test_the_cap_counts_each_holder(tmp_path: Path) -> None:
    world = _world(tmp_path)
    outcome, pairs, auth_id = _run(world, Engine.OPRF, [as_query(world.records[5])],
                                   max_disclosures=1)
    # two holders of person 5's tin+dob key, a cap of one: exactly one record leaves
    assert len({record for _, record, _ in pairs}) == 1
    assert len(world.ledger.disclosures(auth_id)) == 1
    assert outcome.rejected >= 1


def test_the_operator_is_told_to_review_matches_with_several_records() -> None:
    lines = late_summary_lines({"matches_held_by_several_records": 2})
    assert any(line.startswith("shared keys: 2 matches name more than one custodian record")
               for line in lines)
    assert not any("shared keys" in line for line in late_summary_lines({}))


def test_a_key_held_by_more_records_than_the_limit_discloses_none_of_them(
        tmp_path: Path) -> None:
    world = make_world(tmp_path, 20)
    filers = [replace(world.records[5], record_id=f"c-filer{j}", first_name=f"Other{j}",
                      last_name=f"Filer{j}") for j in range(MAX_HOLDERS_PER_KEY)]
    world.records = [*world.records, *filers]
    outcome, pairs, auth_id = _run(world, Engine.OPRF, [as_query(world.records[5])])
    # tin+dob is held by 9 records: refused; the name rule names person 5 alone
    assert pairs == {("q-c5", "c5", "first+last+dob+zip")}
    assert outcome.rejected == 1
    assert {row.record_id for row in world.ledger.disclosures(auth_id)} == {"c5"}


def test_a_full_batch_with_shared_keys_fits_the_wire_limit() -> None:
    # a 1.28M x 10M run: 4,096 outputs gave 4,097 disclosures, which the old limit refused
    reply = kit.pb2.DisclosureResponse(seq=1, disclosures=[
        kit.pb2.Disclosure(index=i % MAX_DISCLOSURE_BATCH, rule_id="tin+dob", pseudonym="p")
        for i in range(MAX_DISCLOSURE_BATCH + 1)])
    validate(reply)
    too_many = MAX_DISCLOSURE_BATCH * MAX_HOLDERS_PER_KEY + 1
    del reply.disclosures[:]
    reply.disclosures.extend(kit.pb2.Disclosure(index=0) for _ in range(too_many))
    with pytest.raises(InvalidElementError, match=r"has \d+ entries; the limit is"):
        validate(reply)
