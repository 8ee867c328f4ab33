"""Aggregate and cardinality tiers (sessions.aggregate): exact answers, no linkage, policy."""

from __future__ import annotations

from dataclasses import replace
from datetime import date
from pathlib import Path

import pytest
import rbcl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.adapters.pools import AggregatePool
from protocol.crypto import oprf
from protocol.crypto import paillier as pf
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
)
from protocol.policy import decide as P
from protocol.sessions import aggregate as A
from protocol.sessions.core import Send
from protocol.sessions.identity import CustodianSession, RequesterSession
from tests.factories import World, as_query, make_person, make_world

VALUE = "tax_paid_cents"
RULE = "tin+dob"
#: 1024-bit keys for speed; production minimums are tested in test_production_minimums.
TEST_PAILLIER = A.PaillierSettings(key_bits=1024, window_bits=6, test_mode=True)


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
              max_queries: int = 10_000, fields: tuple[str, ...] | None = None,
              rules: tuple[str, ...] = (RULE,)) -> P.SignedAuthorization:
    if fields is None:
        fields = (VALUE,) if tier is P.Tier.AGGREGATE else ()
    signed = world.authorize(tier=tier, fields=fields, max_disclosures=0, rules=rules,
                             max_queries=max_queries)
    auth = replace(signed.authorization, min_aggregate_count=min_count)
    return P.sign_authorization(auth, world.authority)


def sessions(world: World, signed: P.SignedAuthorization, queries, *, ops=None,
             **kw: object) -> tuple[A.AggregateRequesterSession, A.AggregateCustodianSession]:
    custodian = A.AggregateCustodian(world.custodian(), ops=ops, paillier_settings=TEST_PAILLIER)
    requester = A.AggregateRequesterSession(
        signed, queries, ops=ops, signing_key=world.requester_key,
        custodian_key=world.custodian_key.public_key(), min_key_bits=1024, **kw,  # type: ignore[arg-type]
    )
    return requester, custodian.session()


def open_both(requester, custodian) -> None:
    requester.handle(custodian.handle(requester.open_request(), peer_id="agency-a"))


def exchange(requester, custodian) -> None:
    """Everything up to (not including) the masked sum."""
    open_both(requester, custodian)
    for chunk in requester.blinded_chunks():
        assert custodian.handle(chunk) is None
    for chunk in custodian.double_blinded_chunks():
        requester.handle(chunk)
    for chunk in custodian.pair_chunks():
        requester.handle(chunk)


def release_entries(world: World) -> list[dict]:
    return [dict(e.payload) for e in world.ledger.audit_entries() if e.kind == "aggregate_release"]


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
        A.AggregateOpenRequest, A.BlindedChunk, A.MaskedSum, CloseRequest, Receipt,
        Send(A.DoubleBlindedChunk), Send(A.CustodianPairsChunk)}
    # Replies (open response, sum reveal) are what a received message's handler returns.
    replies = {A.AggregateOpenResponse, A.SumReveal}
    assert custodian_types == requester_types - replies
    assert not identity_types & (custodian_types | requester_types)
    # MaskedSum is accepted in exactly one state: one decryption per session.
    assert [s for s, t in A.AGGREGATE_CUSTODIAN_TRANSITIONS if t is A.MaskedSum] == [
        A.AggregateCustodianState.SERVING
    ]


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
    assert outcome.result.custodian_pairs == len(set(custodian_ids))
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


# --------------------------------------------------------------------------- no linkage


def test_requester_view_has_no_per_record_linkage(tmp_path: Path) -> None:
    records = [person(i, 1_000_000 + 7919 * i) for i in range(30)]
    world = world_with(tmp_path, records)
    queries = [as_query(r, f"query-record-{k:04d}") for k, r in enumerate(records[:20])]
    queries += [as_query(make_person(900 + j, prefix="stranger-"), f"query-stranger-{j:04d}")
                for j in range(10)]
    requester, custodian = sessions(world, authorize(world), queries)
    wire: list[object] = []
    open_both(requester, custodian)
    a, b = requester._a, custodian._b

    blinded = [c for c in requester.blinded_chunks()]
    for chunk in blinded:
        wire.append(chunk)
        custodian.handle(chunk)
    sent = b"".join(c.elements for c in blinded)
    doubles = list(custodian.double_blinded_chunks())
    returned = b"".join(c.elements for c in doubles)
    pairs = list(custodian.pair_chunks(chunk_pairs=7))
    for chunk in doubles + pairs:
        wire.append(chunk)
        requester.handle(chunk)
    wire.append(masked := requester.masked_sum())
    wire.append(reveal := custodian.handle(masked))
    requester.handle(reveal)
    assert (requester.result.count, requester.result.sum) == (
        20, sum(1_000_000 + 7919 * i for i in range(20)))

    def split(buf: bytes) -> list[bytes]:
        return [buf[i:i + 32] for i in range(0, len(buf), 32)]

    def h2g_times(scalar: bytes, key: bytes) -> bytes:
        element = oprf.hash_to_group(key, A.HASH_TO_GROUP_DST)
        return rbcl.crypto_scalarmult_ristretto255(scalar, element)

    # A sends its distinct keys in a random order, not in query order.
    q_keys = match_keys_bulk([q.person for q in queries], [RULE], today=date.today())[RULE]
    in_query_order = [h2g_times(a, k) for k in q_keys]
    assert sorted(split(sent)) == sorted(in_query_order) and split(sent) != in_query_order
    # B returns b * (each element A sent), as one set in a fresh order.
    expected = [rbcl.crypto_scalarmult_ristretto255(b, e) for e in split(sent)]
    assert sorted(split(returned)) == sorted(expected) and split(returned) != expected
    # B's pairs are b * H(w) for its keys, in a fresh order (not record order).
    c_keys = match_keys_bulk(records, [RULE], today=date.today())[RULE]
    in_record_order = [h2g_times(b, k) for k in c_keys]
    pair_elems = split(b"".join(p.elements for p in pairs))
    assert sorted(pair_elems) == sorted(in_record_order) and pair_elems != in_record_order
    # Nothing identifying or plaintext crosses the wire: no record or query ids, TINs, names,
    # dates, match keys or values (as text or as 8-byte integers).
    wire_bytes = b"".join(m.transcript_bytes() for m in wire)  # type: ignore[attr-defined]
    secrets_: set[bytes] = set(q_keys) | set(c_keys)
    for p in [*records, *(q.person for q in queries)]:
        for text in (p.record_id, p.tin, p.last_name, p.dob, p.address):
            if len(text) >= 6:
                secrets_.add(text.encode())
    for q in queries:
        secrets_.add(q.person.record_id.encode())
    for r in records:
        secrets_.add(r.get(VALUE).encode())
        secrets_.add(int(r.get(VALUE)).to_bytes(8, "big"))
    leaked = [s for s in secrets_ if s and s in wire_bytes]
    assert leaked == []


# --------------------------------------------------------------------------- policy


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


def test_cardinality_tier_has_no_paillier_and_records_the_minimum(tmp_path: Path) -> None:
    records = [person(i) for i in range(6)]  # no value column needed
    world = world_with(tmp_path, records)
    signed = authorize(world, tier=P.Tier.CARDINALITY, min_count=4)
    requester, custodian = sessions(world, signed, [as_query(r) for r in records[:2]])
    wire: list[object] = []
    out = A.run_aggregate_in_process(requester, custodian, requester_id="agency-a",
                                     observe=wire.append)
    assert (out.result.count, out.result.sum, out.result.withheld) == (2, None, False)
    opened = next(m for m in wire if isinstance(m, A.AggregateOpenResponse))
    assert opened.paillier_n == b""
    assert all(m.ciphertexts == b"" for m in wire if isinstance(m, A.CustodianPairsChunk))
    (entry,) = release_entries(world)
    assert entry["tier"] == "cardinality" and entry["below_minimum"] is True


def test_tier_mismatches_are_refused_with_reasons(tmp_path: Path) -> None:
    records = [person(i, 10) for i in range(5)]
    world = world_with(tmp_path, records)
    queries = [as_query(r) for r in records]
    identity = world.authorize(tier=P.Tier.IDENTITY, fields=("address",))
    aggregate = authorize(world)

    with pytest.raises(ValueError, match="identity"):
        A.AggregateRequesterSession(identity, queries)

    custodian = A.AggregateCustodian(world.custodian(), paillier_settings=TEST_PAILLIER)
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
    session = A.AggregateCustodian(world.custodian(), paillier_settings=TEST_PAILLIER).session()
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
    small = authorize(world, max_queries=5)
    requester, custodian = sessions(world, small, queries)
    with pytest.raises(PolicyRefusal) as refused:
        open_both(requester, custodian)
    assert "budget_exhausted" in refused.value.reasons

    signed = authorize(world, max_queries=8)
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


def test_production_minimums(tmp_path: Path) -> None:
    assert A.PaillierSettings().key_bits >= 2048
    with pytest.raises(ValueError, match="production minimum"):
        A.PaillierSettings(key_bits=1024)
    with pytest.raises(ValueError, match="production minimum"):
        A.PaillierSettings(exponent_bits=128)
    # A requester in production mode refuses a custodian's 1024-bit key.
    records = [person(i, 1) for i in range(2)]
    world = world_with(tmp_path, records)
    custodian = A.AggregateCustodian(world.custodian(), paillier_settings=TEST_PAILLIER).session()
    requester = A.AggregateRequesterSession(authorize(world), [as_query(records[0])])
    opened = custodian.handle(requester.open_request(), peer_id="agency-a")
    with pytest.raises(InvalidElementError, match="at least 2048"):
        requester.handle(opened)


# --------------------------------------------------------------------------- one decryption


def test_exactly_one_decryption_per_session(tmp_path: Path) -> None:
    records = [person(i, 50) for i in range(4)]
    world = world_with(tmp_path, records)
    requester, custodian = sessions(world, authorize(world), [as_query(r) for r in records])
    exchange(requester, custodian)
    masked = requester.masked_sum()
    reveal = custodian.handle(masked)
    assert isinstance(reveal, A.SumReveal) and reveal.masked_sum
    assert custodian._private_key is None
    with pytest.raises(ProtocolError):
        custodian.handle(masked)
    assert custodian.state is A.AggregateCustodianState.FAILED
    assert len(release_entries(world)) == 1


def test_session_ids_are_never_reused(tmp_path: Path) -> None:
    records = [person(i, 5) for i in range(3)]
    world = world_with(tmp_path, records)
    signed = authorize(world)
    queries = [as_query(r) for r in records]
    requester, custodian = sessions(world, signed, queries, session_id="agg-fixed")
    open_both(requester, custodian)
    again, custodian2 = sessions(world, signed, queries, session_id="agg-fixed")
    with pytest.raises(ProtocolError, match="already used"):
        open_both(again, custodian2)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [
    bytes(32),  # identity
    b"\x01" + bytes(31),  # not a valid encoding
    oprf.hash_to_group(b"x")[:31] + bytes([oprf.hash_to_group(b"x")[31] | 0x80]),  # high bit
    bytes(33),  # wrong length
])
def test_custodian_rejects_invalid_elements(tmp_path: Path, bad: bytes) -> None:
    records = [person(i, 5) for i in range(3)]
    world = world_with(tmp_path, records)
    requester, custodian = sessions(world, authorize(world), [as_query(r) for r in records])
    open_both(requester, custodian)
    good = next(requester.blinded_chunks()).elements
    with pytest.raises(InvalidElementError):
        custodian.handle(A.BlindedChunk(seq=0, elements=good[:32] + bad))
    assert custodian.state is A.AggregateCustodianState.FAILED


def _all_pairs_match(tmp_path: Path):
    records = [person(i, 7) for i in range(4)]
    world = world_with(tmp_path, records)
    requester, custodian = sessions(world, authorize(world), [as_query(r) for r in records])
    open_both(requester, custodian)
    for chunk in requester.blinded_chunks():
        custodian.handle(chunk)
    for chunk in custodian.double_blinded_chunks():
        requester.handle(chunk)
    (pairs,) = list(custodian.pair_chunks())
    return world, requester, custodian, pairs


def test_requester_rejects_invalid_pairs(tmp_path: Path) -> None:
    _, requester, custodian, pairs = _all_pairs_match(tmp_path)
    size = len(pairs.ciphertexts) // 4
    n = custodian._public_key.n
    p = custodian._private_key.p
    bad_chunks = [
        replace(pairs, elements=bytes(32) + pairs.elements[32:]),
        replace(pairs, ciphertexts=pairs.ciphertexts[:-1]),
        replace(pairs, ciphertexts=bytes(size) * 4),
        replace(pairs, ciphertexts=(n * n).to_bytes(size, "big") * 4),
        replace(pairs, ciphertexts=(p * 3).to_bytes(size, "big") * 4),
    ]
    for bad in bad_chunks:
        with pytest.raises(InvalidElementError):
            requester._on_pairs(bad)
    assert requester.count == 0  # nothing was accepted from the bad chunks
    requester.handle(pairs)
    assert requester.count == 4
    # Through handle(), a bad chunk fails the session with its reason (issue 12).
    _, requester, _, pairs = _all_pairs_match(tmp_path / "twice")
    twice = replace(pairs, elements=pairs.elements[:32] * 2 + pairs.elements[64:])
    with pytest.raises(ProtocolError, match="same key twice"):
        requester.handle(twice)
    assert requester.state is A.AggregateRequesterState.FAILED
    assert requester.failure_reason.startswith("protocol_error: custodian sent the same key")
    with pytest.raises(ProtocolError, match="failed earlier"):
        requester.handle(pairs)


def test_custodian_rejects_invalid_masked_sum_without_decrypting(tmp_path: Path) -> None:
    for k in range(4):
        world, requester, custodian, pairs = _all_pairs_match(tmp_path / f"case{k}")
        requester.handle(pairs)
        size = pf.ciphertext_size(custodian._public_key)
        p = custodian._private_key.p
        bad = [b"", bytes(size), (p * 5).to_bytes(size, "big"), b"\xff" * size][k]
        with pytest.raises(InvalidElementError):
            custodian.handle(A.MaskedSum(count=4, ciphertext=bad))
        assert custodian.state is A.AggregateCustodianState.FAILED
        assert custodian._private_key is None
        assert release_entries(world) == []


def test_out_of_order_steps_are_refused(tmp_path: Path) -> None:
    # Each step out of order fails its session (issue 12: any error -> FAILED), so every
    # case runs on fresh sessions.
    records = [person(i, 1) for i in range(5)]
    world = world_with(tmp_path, records)
    signed = authorize(world, max_queries=100)

    def fresh():
        requester, custodian = sessions(world, signed, [as_query(r) for r in records],
                                        chunk_size=2)
        open_both(requester, custodian)
        return requester, custodian

    requester, _ = fresh()
    with pytest.raises(ProtocolError, match="only 0 of 5 elements sent"):
        requester.masked_sum()
    assert requester.state is A.AggregateRequesterState.FAILED

    requester, custodian = fresh()
    chunks = list(requester.blinded_chunks())
    custodian.handle(chunks[0])
    with pytest.raises(ProtocolError, match="received"):
        custodian.double_blinded_chunks()
    assert custodian.state is A.AggregateCustodianState.FAILED
    assert custodian._b == b""  # the one-time secret went with the session

    requester, custodian = fresh()
    chunks = list(requester.blinded_chunks())
    custodian.handle(chunks[0])
    pair_stream = custodian.pair_chunks(chunk_pairs=2)  # allowed early: independent of A
    first_pairs = next(pair_stream)
    with pytest.raises(ProtocolError, match="before the whole double-blinded set"):
        requester.handle(first_pairs)
    for chunk in chunks[1:]:
        custodian.handle(chunk)
    list(custodian.double_blinded_chunks())
    with pytest.raises(ProtocolError, match="before all pairs"):
        custodian.handle(A.MaskedSum(count=0, ciphertext=b""))
    assert custodian.state is A.AggregateCustodianState.FAILED


def test_non_integer_values_fail_before_any_budget_is_spent(tmp_path: Path) -> None:
    records = [person(0, 5), replace(person(1), extra=((VALUE, "12.50"),))]
    world = world_with(tmp_path, records)
    signed = authorize(world)
    requester, custodian = sessions(world, signed, [as_query(records[0])])
    with pytest.raises(InvalidRecordError, match="custodian-record-1"):
        open_both(requester, custodian)
    assert world.ledger.reservation(requester.session_id) is None


def test_transcript_mismatch_is_detected(tmp_path: Path) -> None:
    records = [person(i, 1) for i in range(3)]
    world = world_with(tmp_path, records)
    requester, custodian = sessions(world, authorize(world), [as_query(r) for r in records])
    exchange(requester, custodian)
    requester.handle(custodian.handle(requester.masked_sum()))
    with pytest.raises(ProtocolError, match="transcript"):
        custodian.handle(CloseRequest(transcript_hash=bytes(32)))


# --------------------------------------------------------------------------- process pool


def test_pool_gives_the_same_answer(tmp_path: Path) -> None:
    records = [person(i, 3 * i) for i in range(40)]
    world = world_with(tmp_path, records)
    queries = [as_query(r) for r in records[::2]]
    with AggregatePool(workers=2, min_parallel=1) as pool:
        requester, custodian = sessions(world, authorize(world), queries, ops=pool)
        out = A.run_aggregate_in_process(requester, custodian, requester_id="agency-a")
        assert (out.result.count, out.result.sum) == (20, sum(3 * i for i in range(0, 40, 2)))
        assert out.custodian_stats["pairs_paillier_cpu_s"] > 0
        # Validation still names the bad element by its index in the whole buffer.
        good = pool.hash_multiply(oprf.random_scalar(), [b"k1", b"k2", b"k3"])
        with pytest.raises(InvalidElementError, match="element 2"):
            pool.multiply(oprf.random_scalar(), good[:64] + bytes(32))
