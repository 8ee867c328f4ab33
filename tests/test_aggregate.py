"""Aggregate and cardinality tiers (sessions.aggregate): exact answers, no linkage, policy,
and a deviating requester that learns no individual's value (issue 13)."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import rbcl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.accounting.export import custodian_export
from protocol.adapters.pools import AggregatePool
from protocol.adapters.sqlite_ledger import Ledger
from protocol.crypto import oprf
from protocol.domain.messages import (
    CloseRequest,
    DisclosureRequest,
    DisclosureResponse,
    EvaluateChunk,
    EvaluatedChunk,
    OpenRequest,
    OpenResponse,
    Receipt,
    TagChunk,
)
from protocol.domain.records import PersonRecord, match_keys_bulk
from protocol.domain.recordstore import CompactRecords
from protocol.errors import (
    InvalidElementError,
    InvalidRecordError,
    PolicyRefusal,
    ProtocolError,
    PSIError,
)
from protocol.policy import decide as P
from protocol.sessions import aggregate as A
from protocol.sessions.core import Send
from protocol.sessions.identity import CustodianSession, RequesterSession
from tests.factories import World, as_query, make_person, make_world
from tests.helpers.aggregate_adversary import Deviant, positions_of, split, times

VALUE = "tax_paid_cents"
RULE = "tin+dob"
PEER = "agency-a"


def person(i: int, value: int | None = None, *, record_id: str | None = None) -> PersonRecord:
    p = make_person(i, prefix="custodian-record-")
    if record_id is not None:
        p = replace(p, record_id=record_id)
    if value is not None:
        p = replace(p, extra=((VALUE, str(value)),))
    return p


def world_with(tmp: Path, records: list[PersonRecord], **policy_kw: object) -> World:
    tmp.mkdir(parents=True, exist_ok=True)
    world = make_world(tmp, n_records=0, **policy_kw)
    world.records = records
    return world


def authorize(world: World, *, tier: P.Tier = P.Tier.AGGREGATE, min_count: int = 0,
              max_evaluations: int = 10_000, fields: tuple[str, ...] | None = None,
              rules: tuple[str, ...] = (RULE,)) -> P.SignedAuthorization:
    if fields is None:
        fields = (VALUE,) if tier is P.Tier.AGGREGATE else ()
    signed = world.authorize(tier=tier, fields=(), max_disclosures=0, rules=rules,
                             max_evaluations=max_evaluations,
                             value_field=fields[0] if fields else "")
    auth = replace(signed.authorization, min_aggregate_count=min_count)
    return P.sign_authorization(auth, world.authority)


def sessions(world: World, signed: P.SignedAuthorization, queries, *, ops=None,
             **kw: object) -> tuple[A.AggregateRequesterSession, A.AggregateCustodianSession]:
    custodian = A.AggregateCustodian(world.custodian(), ops=ops)
    requester = A.AggregateRequesterSession(
        signed, queries, ops=ops, signing_key=world.requester_key,
        custodian_key=world.custodian_key.public_key(), **kw,  # type: ignore[arg-type]
    )
    return requester, custodian.session()


def open_both(requester, custodian) -> None:
    requester.handle(custodian.handle(requester.open_request(), peer_id=PEER))


def exchange(requester, custodian) -> None:
    """Everything up to (not including) the custodian's challenge."""
    open_both(requester, custodian)
    for chunk in requester.blinded_chunks():
        assert custodian.handle(chunk) is None
    for chunk in custodian.custodian_chunks():
        requester.handle(chunk)
    for chunk in requester.reblinded_chunks():
        custodian.handle(chunk)


def release_entries(world: World) -> list[dict]:
    return [dict(e.payload) for e in world.ledger.audit_entries() if e.kind == "aggregate_release"]


def key_of(record: PersonRecord) -> bytes:
    (key,) = match_keys_bulk([record], [RULE], today=date.today())[RULE]
    assert key is not None
    return key


# --------------------------------------------------------------------------- state machines


def test_transition_tables_hold_only_this_tiers_messages() -> None:
    identity_types = {OpenRequest, OpenResponse, TagChunk, EvaluateChunk, EvaluatedChunk,
                      DisclosureRequest, DisclosureResponse}

    def message_types(table) -> set[type]:
        return {e.message if isinstance(e, Send) else e for _, e in table}

    custodian_types = message_types(A.AGGREGATE_CUSTODIAN_TRANSITIONS)
    requester_types = message_types(A.AGGREGATE_REQUESTER_TRANSITIONS)
    # The tables cover both directions: what each side receives and what it sends.
    assert {e for _, e in A.AGGREGATE_CUSTODIAN_TRANSITIONS} == {
        A.AggregateOpenRequest, A.BlindedChunk, A.ReblindedChunk, A.ConsistencyProof,
        CloseRequest, Receipt, Send(A.CustodianChunk), Send(A.MatchChallenge)}
    # Replies (open response, release) are what a received message's handler returns.
    replies = {A.AggregateOpenResponse, A.AggregateRelease}
    assert custodian_types == requester_types - replies
    assert not identity_types & (custodian_types | requester_types)
    # One release per session: the proof is accepted in exactly one state.
    assert [s for s, t in A.AGGREGATE_CUSTODIAN_TRANSITIONS if t is A.ConsistencyProof] == [
        A.AggregateCustodianState.PROVING
    ]
    # Nothing the requester sends carries a count or a value (no count to falsify).
    sent_by_requester = (A.AggregateOpenRequest, A.BlindedChunk, A.ReblindedChunk,
                         A.ConsistencyProof)
    names = {f.name for kind in sent_by_requester for f in dataclasses.fields(kind)}
    assert not names & {"count", "sum", "ciphertext", "masked_sum", "value"}


# --------------------------------------------------------------------------- exact answers


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    custodian_ids=st.lists(st.integers(0, 40), min_size=0, max_size=14),
    values=st.lists(st.integers(0, 5_000_000_000), min_size=14, max_size=14),
    member_picks=st.lists(st.integers(0, 13), max_size=10),
    strangers=st.integers(0, 4),
    tier=st.sampled_from([P.Tier.AGGREGATE, P.Tier.CARDINALITY]),
)
def test_count_and_sum_equal_the_plaintext_answer(
    tmp_path_factory, custodian_ids, values, member_picks, strangers, tier
) -> None:
    # Repeated ids = the same person held twice (duplicate records); repeated picks = the
    # same person queried twice.  Both must count once; duplicate records' values add up.
    records = [person(i, values[k], record_id=f"custodian-record-{k}")
               for k, i in enumerate(custodian_ids)]
    members = [custodian_ids[p] for p in member_picks if p < len(custodian_ids)]
    queries = [as_query(make_person(i, prefix="custodian-record-"), f"q{n}")
               for n, i in enumerate(members)]
    queries += [as_query(make_person(500 + j, prefix="x"), f"s{j}") for j in range(strangers)]
    if not queries:
        queries = [as_query(make_person(999, prefix="x"))]
    world = world_with(tmp_path_factory.mktemp("agg"), records)
    requester, custodian = sessions(world, authorize(world, tier=tier), queries)
    outcome = A.run_aggregate_in_process(requester, custodian, requester_id="agency-a")

    expected_count = len(set(members) & set(custodian_ids))
    expected_sum = sum(values[k] for k, i in enumerate(custodian_ids) if i in set(members))
    assert outcome.result.count == expected_count
    assert outcome.result.withheld is False
    if tier is P.Tier.AGGREGATE:
        assert outcome.result.sum == expected_sum
    else:
        assert outcome.result.sum is None
    assert outcome.result.custodian_elements == len(set(custodian_ids))
    assert outcome.result.elements == (len(set(members)) + strangers or 1)
    # The helper that states the ideal functionality agrees.
    q_keys = match_keys_bulk([q.person for q in queries], [RULE], today=date.today())[RULE]
    c_keys = match_keys_bulk(records, [RULE], today=date.today())[RULE]
    assert A.plaintext_answer(q_keys, zip(c_keys, values, strict=False)) == (
        expected_count, expected_sum)



def test_negative_values_and_receipt(tmp_path: Path) -> None:
    records = [person(i, v) for i, v in enumerate([-500, 1200, 7, -3, 10**12])]
    world = world_with(tmp_path, records)
    queries = [as_query(r) for r in records[:4]]
    requester, custodian = sessions(world, authorize(world), queries)
    outcome = A.run_aggregate_in_process(requester, custodian, requester_id="agency-a")
    assert (outcome.result.count, outcome.result.sum) == (4, -500 + 1200 + 7 - 3)
    receipt = outcome.receipt
    assert receipt.disclosed == 0 and receipt.evaluated == 4 and receipt.requester_signature
    world.custodian_key.public_key().verify(receipt.custodian_signature, receipt.signed_bytes())
    (row,) = world.ledger.receipts(receipt.authorization_id)
    assert row.requester_signature == receipt.requester_signature
    assert world.ledger.budget(receipt.authorization_id).evaluated == 4
    (entry,) = release_entries(world)
    assert entry["count"] == 4 and entry["sum_released"] is True and entry["tier"] == "aggregate"



def test_compact_record_store_and_person_queries(tmp_path: Path) -> None:
    """The services keep records in a CompactRecords store and may pass persons, not queries."""
    records = [person(i, 10 * i) for i in range(12)]
    world = world_with(tmp_path, records)
    world.records = CompactRecords.of(records)  # type: ignore[assignment]
    persons = CompactRecords.of([replace(r, record_id=f"q{k}") for k, r in enumerate(records[3:9])])
    requester, custodian = sessions(world, authorize(world), persons)
    out = A.run_aggregate_in_process(requester, custodian, requester_id="agency-a")
    assert (out.result.count, out.result.sum) == (6, sum(10 * i for i in range(3, 9)))
    assert requester._keys is None  # nothing per query survives blinding



def test_min_aggregate_count_withholds_the_sum(tmp_path: Path) -> None:
    records = [person(i, 100 + i) for i in range(10)]
    world = world_with(tmp_path, records)
    signed = authorize(world, min_count=5)

    few = [as_query(r) for r in records[:3]]
    requester, custodian = sessions(world, signed, few)
    out = A.run_aggregate_in_process(requester, custodian, requester_id="agency-a")
    assert out.result.count == 3 and out.result.sum is None and out.result.withheld
    assert out.result.reason == "below_minimum_count"

    enough = [as_query(r, f"q2-{k}") for k, r in enumerate(records[:6])]
    requester, custodian = sessions(world, signed, enough)
    out = A.run_aggregate_in_process(requester, custodian, requester_id="agency-a")
    assert (out.result.count, out.result.sum, out.result.withheld) == (6, 615, False)

    first, second = release_entries(world)
    assert (first["count"], first["sum_released"], first["below_minimum"]) == (3, False, True)
    assert (second["count"], second["sum_released"], second["below_minimum"]) == (6, True, False)



def test_tier_mismatches_are_refused_with_reasons(tmp_path: Path) -> None:
    records = [person(i, 10) for i in range(5)]
    world = world_with(tmp_path, records)
    queries = [as_query(r) for r in records]
    identity = world.authorize(tier=P.Tier.IDENTITY, fields=("address",))
    aggregate = authorize(world)

    with pytest.raises(ValueError, match="identity"):
        A.AggregateRequesterSession(identity, queries)

    custodian = A.AggregateCustodian(world.custodian())
    # An identity-tier authorization presented to the aggregate session.
    s = custodian.session()
    req = A.AggregateOpenRequest("s-identity", identity.to_bytes(), "identity", RULE, "", 5)
    with pytest.raises(PolicyRefusal) as refused:
        s.handle(req, peer_id="agency-a")
    assert "tier_not_permitted" in refused.value.reasons
    assert s.state is A.AggregateCustodianState.FAILED
    # An aggregate authorization used for another tier.
    s = custodian.session()
    req = A.AggregateOpenRequest("s-card", aggregate.to_bytes(), "cardinality", RULE, "", 5)
    with pytest.raises(PolicyRefusal) as refused:
        s.handle(req, peer_id="agency-a")
    assert "tier_not_permitted" in refused.value.reasons
    # ...and to the identity-tier custodian: refused there too.
    identity_custodian = CustodianSession(world.custodian())
    with pytest.raises(PolicyRefusal) as refused:
        identity_custodian.handle(RequesterSession(aggregate, queries).open_request(),
                                  peer_id="agency-a")
    assert "tier_not_permitted" in refused.value.reasons
    # Messages of one tier are refused by the other tier's state machine.
    with pytest.raises(ProtocolError):
        CustodianSession(world.custodian()).handle(
            A.AggregateRequesterSession(aggregate, queries).open_request(), peer_id="agency-a")
    requester, agg_session = sessions(world, aggregate, queries)
    open_both(requester, agg_session)
    with pytest.raises(ProtocolError):
        agg_session.handle(EvaluateChunk(seq=0, elements=bytes(32)))
    assert agg_session.state is A.AggregateCustodianState.FAILED
    s = custodian.session()
    with pytest.raises(ProtocolError):
        s.handle(RequesterSession(identity, queries).open_request(), peer_id="agency-a")


def test_named_subject_authorizations_are_not_served(tmp_path: Path) -> None:
    records = [person(i, 10) for i in range(3)]
    world = world_with(tmp_path, records)
    bulk = authorize(world)
    named = P.sign_authorization(
        replace(bulk.authorization, mode=P.Mode.NAMED_SUBJECTS, subject_commitment=bytes(32)),
        world.authority,
    )
    with pytest.raises(ValueError, match="named-subject"):
        A.AggregateRequesterSession(named, [as_query(records[0])])
    session = A.AggregateCustodian(world.custodian()).session()
    req = A.AggregateOpenRequest("s-named", named.to_bytes(), "aggregate", RULE, VALUE, 1)
    with pytest.raises(PolicyRefusal) as refused:
        session.handle(req, peer_id="agency-a")
    assert "mode_not_permitted" in refused.value.reasons


def test_value_field_must_be_authorized_and_allowed(tmp_path: Path) -> None:
    records = [person(i, 10) for i in range(3)]
    queries = [as_query(r) for r in records]
    world = world_with(tmp_path / "a", records)
    signed = authorize(world)
    cases = [
        ("other_column", "field_not_permitted"),
        ("tin", "field_not_permitted"),
        ("", "malformed"),
    ]
    for field, reason in cases:
        requester, custodian = sessions(world, signed, queries, value_field=field)
        with pytest.raises(PolicyRefusal) as refused:
            open_both(requester, custodian)
        assert reason in refused.value.reasons
    # A custodian that never releases the column refuses even an authorized sum.
    barred = world_with(tmp_path / "b", records, never_disclose=frozenset({"tin", VALUE}))
    requester, custodian = sessions(barred, authorize(barred), queries)
    with pytest.raises(PolicyRefusal) as refused:
        open_both(requester, custodian)
    assert "field_never_disclosed" in refused.value.reasons
    # The cardinality tier sums nothing.
    card = authorize(world, tier=P.Tier.CARDINALITY)
    requester, custodian = sessions(world, card, queries, value_field=VALUE)
    with pytest.raises(PolicyRefusal) as refused:
        open_both(requester, custodian)
    assert "field_not_permitted" in refused.value.reasons
    assert release_entries(world) == []


def test_budget_is_reserved_and_counted(tmp_path: Path) -> None:
    records = [person(i, 1) for i in range(8)]
    world = world_with(tmp_path, records)
    queries = [as_query(r) for r in records]
    small = authorize(world, max_evaluations=5)
    requester, custodian = sessions(world, small, queries)
    with pytest.raises(PolicyRefusal) as refused:
        open_both(requester, custodian)
    assert "budget_exhausted" in refused.value.reasons

    signed = authorize(world, max_evaluations=8)
    requester, custodian = sessions(world, signed, queries, chunk_size=3)
    open_both(requester, custodian)
    chunks = list(requester.blinded_chunks())
    custodian.handle(chunks[0])
    auth_id = signed.authorization.authorization_id
    assert world.ledger.budget(auth_id).evaluated == 3
    with pytest.raises(ProtocolError, match="out of order"):
        custodian.handle(chunks[2])
    # The whole budget went to that session; a new one cannot open.
    requester, custodian = sessions(world, signed, queries[:1])
    with pytest.raises(PolicyRefusal) as refused:
        open_both(requester, custodian)
    assert "budget_exhausted" in refused.value.reasons



def test_session_ids_are_never_reused(tmp_path: Path) -> None:
    records = [person(i, 5) for i in range(3)]
    world = world_with(tmp_path, records)
    signed = authorize(world)
    queries = [as_query(r) for r in records]
    requester, custodian = sessions(world, signed, queries, session_id="agg-fixed")
    open_both(requester, custodian)
    again, custodian2 = sessions(world, signed, queries, session_id="agg-fixed")
    with pytest.raises(PolicyRefusal, match="session id is not available"):  # issue 13
        open_both(again, custodian2)



def test_non_integer_values_fail_before_any_budget_is_spent(tmp_path: Path) -> None:
    records = [person(0, 5), replace(person(1), extra=((VALUE, "12.50"),))]
    world = world_with(tmp_path, records)
    signed = authorize(world)
    requester, custodian = sessions(world, signed, [as_query(records[0])])
    with pytest.raises(InvalidRecordError, match="custodian-record-1"):
        open_both(requester, custodian)
    assert world.ledger.reservation(requester.session_id) is None




def test_cardinality_tier_releases_the_true_count_only(tmp_path: Path) -> None:
    records = [person(i) for i in range(6)]  # no value column needed
    world = world_with(tmp_path, records)
    signed = authorize(world, tier=P.Tier.CARDINALITY, min_count=4)
    requester, custodian = sessions(world, signed, [as_query(r) for r in records[:2]])
    wire: list[object] = []
    out = A.run_aggregate_in_process(requester, custodian, requester_id=PEER,
                                     observe=wire.append)
    assert (out.result.count, out.result.sum, out.result.withheld) == (2, None, False)
    assert all(m.sum is None for m in wire if isinstance(m, A.AggregateRelease))
    (entry,) = release_entries(world)
    assert entry["tier"] == "cardinality" and entry["below_minimum"] is True
    assert entry["sum_released"] is False
    assert world.ledger.aggregate_releases(PEER) == []  # no sum, no contributing record


# --------------------------------------------------------------------------- no linkage


def test_requester_view_has_no_per_record_linkage(tmp_path: Path) -> None:
    records = [person(i, 1_000_000 + 7919 * i) for i in range(30)]
    world = world_with(tmp_path, records)
    queries = [as_query(r, f"query-record-{k:04d}") for k, r in enumerate(records[:20])]
    queries += [as_query(make_person(900 + j, prefix="stranger-"), f"query-stranger-{j:04d}")
                for j in range(10)]
    requester, custodian = sessions(world, authorize(world), queries)
    wire: list[object] = []
    b: list[bytes] = []

    def observe(message: object) -> None:
        wire.append(message)
        if isinstance(message, A.BlindedChunk) and not b:
            b.append(custodian._b)  # the test's window on the custodian's secret

    out = A.run_aggregate_in_process(requester, custodian, requester_id=PEER, observe=observe)
    assert (out.result.count, out.result.sum) == (20, sum(1_000_000 + 7919 * i for i in range(20)))
    sent = b"".join(m.elements for m in wire if isinstance(m, A.BlindedChunk))
    custodian_elems = split(b"".join(m.elements for m in wire if isinstance(m, A.CustodianChunk)))
    q_keys = match_keys_bulk([q.person for q in queries], [RULE], today=date.today())[RULE]
    c_keys = match_keys_bulk(records, [RULE], today=date.today())[RULE]
    # A sends its distinct keys in a random order, not in query order.
    assert sorted(split(sent)) != split(sent) or len(q_keys) < 2
    # B's elements are b * H(w) for its keys in a fresh order (not record order), and the
    # matched positions are random positions of that order.
    in_record_order = [times(b[0], oprf.hash_to_group(k, A.HASH_TO_GROUP_DST)) for k in c_keys]
    assert sorted(custodian_elems) == sorted(in_record_order)
    assert custodian_elems != in_record_order
    (challenge,) = [m for m in wire if isinstance(m, A.MatchChallenge)]
    assert challenge.count == 20 and len(challenge.matched) == -(-30 // 8)
    # Nothing identifying or plaintext crosses the wire except the released total: no record
    # or query ids, TINs, names, dates, match keys or per-record values.
    wire_bytes = b"".join(m.transcript_bytes() for m in wire  # type: ignore[attr-defined]
                          if hasattr(m, "transcript_bytes"))
    secrets_: set[bytes] = set(q_keys) | set(c_keys)
    for p in [*records, *(q.person for q in queries)]:
        for text in (p.record_id, p.tin, p.last_name, p.dob, p.address):
            if len(text) >= 6:
                secrets_.add(text.encode())
    for r in records:
        secrets_.add(r.get(VALUE).encode())
        secrets_.add(int(r.get(VALUE)).to_bytes(8, "big"))
    leaked = [s for s in secrets_ if s and s in wire_bytes]
    assert leaked == []


# --------------------------------------------------------------------------- issue 13


def _deviant_session(world: World, signed: P.SignedAuthorization, targets: list[PersonRecord],
                     pack_at: list[int] | None = None):
    """Open a custodian session and run a Deviant through it up to the challenge."""
    custodian = A.AggregateCustodian(world.custodian()).session()
    deviant = Deviant(session_id=f"agg-deviant-{oprf.random_scalar().hex()[:12]}",
                      target_keys=[key_of(t) for t in targets])
    upload = deviant.upload()
    custodian.handle(A.AggregateOpenRequest(
        deviant.session_id, signed.to_bytes(), "aggregate", RULE, VALUE, len(upload)),
        peer_id=PEER)
    custodian.handle(A.BlindedChunk(0, b"".join(upload)), peer_id=PEER)
    elems = split(b"".join(c.elements for c in custodian.custodian_chunks(peer_id=PEER)))
    where = positions_of(custodian._b, elems, deviant.target_keys)  # the oracle
    others = [j for j in range(len(elems)) if j not in where]
    pack = pack_at if pack_at is not None else others[:deviant.packed]
    reblinded = deviant.reblind(elems, where, pack)
    custodian.handle(A.ReblindedChunk(0, b"".join(reblinded)), peer_id=PEER)
    challenge = custodian.challenge(peer_id=PEER)
    return custodian, deviant, elems, reblinded, challenge, where, pack


def test_deviating_requester_learns_no_individual_value(tmp_path: Path) -> None:
    """The review's attack, translated: distinct scalars per element, dummies, no count of its
    own to falsify, and scalar multiples of a known member packed into other positions so
    the matched count reaches the minimum, with the other contributors chosen (through an
    oracle no real requester has) to be records whose values the attacker knows.  Every
    proof it can make is refused, nothing is released, nothing is recorded as released."""
    values = [1_000_003 * (i + 1) for i in range(40)]
    records = [person(i, v) for i, v in enumerate(values)]
    world = world_with(tmp_path, records)
    signed = authorize(world, min_count=10)
    targets = records[:3]  # three named individuals
    for attempt in ["scalar-0", "scalar-1", "scalar-2", "empty", "random"]:
        custodian, deviant, elems, reblinded, challenge, where, pack = _deviant_session(
            world, signed, targets)
        # Without the proof, packing would have worked: 3 targets + 7 packed = 10 matches.
        positions = np.flatnonzero(np.unpackbits(np.frombuffer(challenge.matched, np.uint8)))
        assert challenge.count == 10 and set(positions.tolist()) == set(where) | set(pack)
        proof = deviant.proof_attempts(challenge.matched, elems, reblinded,
                                       positions.tolist())[attempt]
        with pytest.raises(PSIError) as refused:
            custodian.handle(proof, peer_id=PEER)
        assert isinstance(refused.value, InvalidElementError | ProtocolError), attempt
        assert custodian.state is A.AggregateCustodianState.FAILED
        assert custodian.released is None
    assert world.ledger.aggregate_releases(PEER) == []
    assert release_entries(world) == []


def test_consistent_deviant_gets_only_its_true_count(tmp_path: Path) -> None:
    """The best a requester can do and still pass the proof: one scalar for the reblinding.
    Then only elements it uploaded under that scalar for keys it truly holds can match:
    distinct scalars, dummies and multiples drop out, and the true count (1) is below the
    minimum, so the sum is withheld."""
    values = [7_000_001 * (i + 1) for i in range(30)]
    records = [person(i, v) for i, v in enumerate(values)]
    world = world_with(tmp_path, records)
    signed = authorize(world, min_count=3)
    custodian = A.AggregateCustodian(world.custodian()).session()
    deviant = Deviant(session_id="agg-consistent", target_keys=[key_of(r) for r in records[:3]])
    upload = deviant.upload()
    custodian.handle(A.AggregateOpenRequest(
        deviant.session_id, signed.to_bytes(), "aggregate", RULE, VALUE, len(upload)),
        peer_id=PEER)
    custodian.handle(A.BlindedChunk(0, b"".join(upload)), peer_id=PEER)
    elems = split(b"".join(c.elements for c in custodian.custodian_chunks(peer_id=PEER)))
    x = deviant.scalars[0]
    reblinded = [times(x, c) for c in elems]
    custodian.handle(A.ReblindedChunk(0, b"".join(reblinded)), peer_id=PEER)
    challenge = custodian.challenge(peer_id=PEER)
    assert challenge.count == 1  # only t_0 was uploaded under x
    positions = np.flatnonzero(np.unpackbits(np.frombuffer(challenge.matched, np.uint8)))
    weights = A.consistency_weights(
        deviant.session_id, challenge.matched, hashlib.sha256(b"".join(elems)).digest(),
        hashlib.sha256(b"".join(reblinded)).digest(), 1)
    proof = A.prove_consistency(x, weights, [elems[int(positions[0])]])
    release = custodian.handle(proof, peer_id=PEER)
    assert (release.count, release.sum, release.withheld) == (1, None, True)
    assert release.reason == "below_minimum_count"
    (entry,) = release_entries(world)
    assert (entry["count"], entry["sum_released"]) == (1, False)


def test_reblinded_stream_must_have_one_valid_distinct_element_per_position(
        tmp_path: Path) -> None:
    records = [person(i, 5) for i in range(6)]
    world = world_with(tmp_path, records)
    signed = authorize(world, max_evaluations=1000)

    def to_reblinding():
        requester, custodian = sessions(world, signed, [as_query(r) for r in records])
        open_both(requester, custodian)
        for chunk in requester.blinded_chunks():
            custodian.handle(chunk)
        for chunk in custodian.custodian_chunks():
            requester.handle(chunk)
        (chunk,) = list(requester.reblinded_chunks())
        return custodian, chunk.elements

    custodian, good = to_reblinding()
    with pytest.raises(ProtocolError, match="exactly one per position"):
        custodian.handle(A.ReblindedChunk(0, good + good[:32]))
    custodian, good = to_reblinding()
    custodian.handle(A.ReblindedChunk(0, good[:-32]))
    with pytest.raises(ProtocolError, match="exactly one per position"):
        custodian.challenge()
    custodian, good = to_reblinding()
    with pytest.raises(InvalidElementError, match="element 5"):
        custodian.handle(A.ReblindedChunk(0, good[:-32] + bytes(32)))
    custodian, good = to_reblinding()
    with pytest.raises(InvalidElementError, match="multiple of 32"):
        custodian.handle(A.ReblindedChunk(0, good[:-1]))
    custodian, good = to_reblinding()
    custodian.handle(A.ReblindedChunk(0, good[:32] * 2 + good[64:]))  # one element twice
    with pytest.raises(ProtocolError, match="same reblinded element at two positions"):
        custodian.challenge()
    assert custodian.state is A.AggregateCustodianState.FAILED
    assert release_entries(world) == []


def test_consistency_proof_round_trip_and_tampering() -> None:
    scalar = oprf.random_scalar()
    custodian = [rbcl.crypto_core_ristretto255_random() for _ in range(5)]
    reblinded = [times(scalar, c) for c in custodian]
    weights = A.consistency_weights("s", b"\xff", b"c" * 32, b"r" * 32, 5)
    proof = A.prove_consistency(scalar, weights, custodian)
    assert A.verify_consistency(proof, weights, custodian, reblinded)
    swapped = [reblinded[1], reblinded[0], *reblinded[2:]]
    assert not A.verify_consistency(proof, weights, custodian, swapped)
    other = A.consistency_weights("s", b"\xff", b"c" * 32, b"R" * 32, 5)
    assert not A.verify_consistency(proof, other, custodian, reblinded)
    for bad in (replace(proof, response=b"\xff" * 32), replace(proof, challenge=bytes(32)),
                replace(proof, public_element=bytes(32))):
        assert not A.verify_consistency(bad, weights, custodian, reblinded)


# --------------------------------------------------------------------------- differencing


def _release(world: World, signed: P.SignedAuthorization, queries: list) -> A.AggregateOutcome:
    requester, custodian = sessions(world, signed, queries)
    return A.run_aggregate_in_process(requester, custodian, requester_id=PEER)


def test_differencing_by_one_record_is_refused(tmp_path: Path) -> None:
    values = [100 + 17 * i for i in range(30)]
    records = [person(i, v) for i, v in enumerate(values)]
    world = world_with(tmp_path, records)
    signed = authorize(world, min_count=5)
    first = _release(world, signed, [as_query(r, f"a{k}") for k, r in enumerate(records[:10])])
    assert first.result.sum == sum(values[:10])
    # The same list plus the target: the difference would be the target's value.
    with pytest.raises(PolicyRefusal) as refused:
        _release(world, signed, [as_query(r, f"b{k}") for k, r in enumerate(records[:11])])
    assert refused.value.reasons == (P.Reason.RELEASE_OVERLAP.value,)
    assert "differ from release" in str(refused.value) and "by 1," in str(refused.value)
    assert P.REFUSAL_CATEGORY[P.Reason.RELEASE_OVERLAP] == "permission_denied"
    # Another authorization of the same requester is held to the same rule.
    with pytest.raises(PolicyRefusal):
        _release(world, authorize(world, min_count=5),
                 [as_query(r, f"c{k}") for k, r in enumerate(records[1:10])])
    # A set that differs by the minimum or more is released.
    far = _release(world, signed, [as_query(r, f"d{k}") for k, r in enumerate(records[5:15])])
    assert far.result.sum == sum(values[5:15])
    rows = world.ledger.aggregate_releases(PEER)
    assert [r.session_id for r in rows] == [first.receipt.session_id, far.receipt.session_id]
    refusals = [e.payload for e in world.ledger.audit_entries()
                if e.kind == "aggregate_release_refused"]
    assert len(refusals) == 2 and refusals[0]["reason"] == "release_overlap"


def test_overlap_rule_survives_a_restart_and_oversight_can_reverify(tmp_path: Path) -> None:
    values = [5000 + i for i in range(20)]
    records = [person(i, v) for i, v in enumerate(values)]
    world = world_with(tmp_path / "w", records)
    signed = authorize(world, min_count=4)
    first = _release(world, signed, [as_query(r) for r in records[:8]])
    path = world.ledger.path
    world.ledger.close()
    world.ledger = Ledger(path)  # a restarted custodian: new process state, same SQLite file
    with pytest.raises(PolicyRefusal) as refused:
        _release(world, signed, [as_query(r, f"x{k}") for k, r in enumerate(records[:9])])
    assert refused.value.reasons == ("release_overlap",)
    # Oversight: the stored digests name exactly the contributing records (recomputed from
    # the records with the custodian's key), and their values add up to the audited sum.
    (row,) = world.ledger.aggregate_releases(PEER)
    assert row.session_id == first.receipt.session_id
    owner = A.AggregateCustodian(world.custodian())
    digests = {owner.release_digests([i]): values[i] for i in range(len(records))}
    stored = [row.contributing[i:i + A.RELEASE_DIGEST_SIZE]
              for i in range(0, len(row.contributing), A.RELEASE_DIGEST_SIZE)]
    assert sorted(stored) == stored and len(stored) == 8
    (entry,) = [e for e in release_entries(world) if e["sum_released"]]
    assert int(entry["sum"]) == sum(digests[d] for d in stored) == sum(values[:8])
    assert entry["contributing_sha256"] == hashlib.sha256(row.contributing).hexdigest()
    assert entry["contributing_records"] == 8
    # the oversight export carries the same account (a refused release left no row)
    exported = custodian_export(world.ledger, signed.authorization.authorization_id)
    assert exported["counts"]["aggregate_releases"] == 1
    (item,) = exported["aggregate_releases"]
    assert item["session_id"] == row.session_id and item["audit_seq"] == row.audit_seq
    assert bytes.fromhex(item["contributing"]) == row.contributing
    assert item["contributing_sha256"] == entry["contributing_sha256"]


def test_duplicate_records_contribute_all_their_ids(tmp_path: Path) -> None:
    """A person held twice counts once, and both records are in the release's record."""
    records = [person(1, 10, record_id="r-a"), person(1, 15, record_id="r-b"), person(2, 1)]
    world = world_with(tmp_path, records)
    out = _release(world, authorize(world, min_count=1), [as_query(records[0])])
    assert (out.result.count, out.result.sum) == (1, 25)
    (row,) = world.ledger.aggregate_releases(PEER)
    assert len(row.contributing) == 2 * A.RELEASE_DIGEST_SIZE


# --------------------------------------------------------------------------- more checks


def test_requester_checks_the_challenge_and_the_release(tmp_path: Path) -> None:
    records = [person(i, 3) for i in range(9)]
    world = world_with(tmp_path, records)
    signed = authorize(world, max_evaluations=1000)
    bad = [A.MatchChallenge(1, b"\x00"),  # wrong length for 9 positions
           A.MatchChallenge(1, b"\x00\x01"),  # a bit past the last position
           A.MatchChallenge(2, b"\x80\x00")]  # count disagrees with the bitmap
    for challenge in bad:
        requester, custodian = sessions(world, signed, [as_query(r) for r in records[:2]])
        exchange(requester, custodian)
        with pytest.raises(ProtocolError):
            requester.handle(challenge)
        assert requester.state is A.AggregateRequesterState.FAILED
    requester, custodian = sessions(world, signed, [as_query(r) for r in records[:2]])
    exchange(requester, custodian)
    requester.handle(custodian.challenge())
    release = custodian.handle(requester.consistency_proof())
    with pytest.raises(ProtocolError, match="another count"):
        requester.handle(replace(release, count=release.count + 1))


def test_custodian_rejects_invalid_uploads_and_early_steps(tmp_path: Path) -> None:
    records = [person(i, 5) for i in range(3)]
    world = world_with(tmp_path, records)
    signed = authorize(world, max_evaluations=1000)
    for bad in [bytes(32), b"\x01" + bytes(31), bytes(33)]:
        requester, custodian = sessions(world, signed, [as_query(r) for r in records])
        open_both(requester, custodian)
        good = next(requester.blinded_chunks()).elements
        with pytest.raises(InvalidElementError):
            custodian.handle(A.BlindedChunk(seq=0, elements=good[:32] + bad))
        assert custodian.state is A.AggregateCustodianState.FAILED
    # The custodian's elements only after the whole upload: nothing uploaded depends on b.
    requester, custodian = sessions(world, signed, [as_query(r) for r in records], chunk_size=2)
    open_both(requester, custodian)
    custodian.handle(next(requester.blinded_chunks()))
    with pytest.raises(ProtocolError, match="only 2 of 3 blinded elements received"):
        custodian.custodian_chunks()
    assert custodian._b == b""  # the one-time secret went with the session
    # No challenge before the reblinded elements, no proof before the challenge.
    requester, custodian = sessions(world, signed, [as_query(r) for r in records])
    open_both(requester, custodian)
    with pytest.raises(ProtocolError):
        custodian.handle(A.ConsistencyProof(b"", b"", b""))


def test_transcript_mismatch_is_detected(tmp_path: Path) -> None:
    records = [person(i, 1) for i in range(3)]
    world = world_with(tmp_path, records)
    requester, custodian = sessions(world, authorize(world), [as_query(r) for r in records])
    exchange(requester, custodian)
    requester.handle(custodian.challenge())
    requester.handle(custodian.handle(requester.consistency_proof()))
    with pytest.raises(ProtocolError, match="transcript"):
        custodian.handle(CloseRequest(transcript_hash=bytes(32)))


def test_empty_custodian_file(tmp_path: Path) -> None:
    world = world_with(tmp_path, [])
    out = _release(world, authorize(world), [as_query(make_person(1, prefix="x"))])
    assert (out.result.count, out.result.sum, out.result.custodian_elements) == (0, 0, 0)


# --------------------------------------------------------------------------- process pool


def test_pool_gives_the_same_answer(tmp_path: Path) -> None:
    records = [person(i, 3 * i) for i in range(40)]
    world = world_with(tmp_path, records)
    queries = [as_query(r) for r in records[::2]]
    with AggregatePool(workers=2, min_parallel=1) as pool:
        requester, custodian = sessions(world, authorize(world), queries, ops=pool)
        out = A.run_aggregate_in_process(requester, custodian, requester_id=PEER)
        assert (out.result.count, out.result.sum) == (20, sum(3 * i for i in range(0, 40, 2)))
        assert out.custodian_stats["verify_s"] > 0
        # Validation still names the bad element by its index in the whole buffer.
        good = pool.hash_multiply(oprf.random_scalar(), [b"k1", b"k2", b"k3"])
        with pytest.raises(InvalidElementError, match="element 2"):
            pool.multiply(oprf.random_scalar(), good[:64] + bytes(32))


def test_release_row_and_audit_entry_are_one_transaction(tmp_path: Path) -> None:
    """A refused release writes neither its row nor its audit entry; rows are append-only."""
    world = world_with(tmp_path, [person(0, 1)])
    # A session whose sum was withheld: it has a session row and no release row.
    out = _release(world, authorize(world, min_count=5), [as_query(world.records[0])])
    assert out.result.withheld
    sid = out.receipt.session_id
    auth_id = out.receipt.authorization_id
    head = world.ledger.audit_head()

    def refuse(earlier) -> None:
        raise PolicyRefusal("release_overlap: test", reasons=("release_overlap",))

    with pytest.raises(PolicyRefusal):
        world.ledger.record_aggregate_release(auth_id, sid, "agency-z", b"\x01" * 16,
                                              {"session_id": sid}, refuse)
    assert world.ledger.aggregate_releases("agency-z") == []
    assert world.ledger.audit_head() == head
    row = world.ledger.record_aggregate_release(auth_id, sid, "agency-z", b"\x01" * 16,
                                                {"session_id": sid}, lambda earlier: None)
    assert world.ledger.aggregate_releases("agency-z") == [row]
    assert world.ledger.audit_head()[0] == row.audit_seq == head[0] + 1
    with sqlite3.connect(world.ledger.path) as conn, pytest.raises(sqlite3.DatabaseError,
                                                                   match="append-only"):
        conn.execute("UPDATE aggregate_releases SET contributing = x'00'")
